"""Decode + resize of full-size photos: the old path (full decode, then resize) vs the DCT-scaled one.

    python benchmarks/decode.py [--repeats 15] [--photo PATH]

Builds a 1920x1080 and a 4000x3000 JPEG (quality 90) by upscaling a real photo from
``../shared/data/real-roadwork-mini`` (or ``--photo``; a synthetic scene when neither exists), then times, side by
side in one run and from bytes in memory (no disk I/O), open → decode → resize → centre crop to a uint8 array:

- ``old``: ``Image.open(...).convert("RGB")`` in full, then ``resize_uint8`` (the path before issue 17);
- ``new``: ``data.preprocess.load_resized`` — JPEG DCT scaling to the smallest 1/1, 1/2, 1/4, 1/8 size whose
  shorter side is still >= the resize side, then the same ``resize_uint8``.

A second table times the data stage's per-file check (read, sha256, decode to prove the file whole) before
(full decode) and now (``check_image``: a JPEG at 1/8 scale; the stage also runs it in ``data.workers`` processes).

ms/img is the median over ``--repeats`` rounds (old and new alternate within each round: this machine is
shared). ``mean |diff|`` is the mean absolute difference of the two uint8 outputs (levels of 255).
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from roadwork.data.preprocess import PreprocessSpec, load_resized, load_rgb, resize_uint8

sys.path.insert(0, str(Path(__file__).parent))
from _machine import machine_lines

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-roadwork-mini"


def _source(photo: str | None) -> tuple[Image.Image, str]:
    if photo:
        return Image.open(photo).convert("RGB"), photo
    files = sorted((REAL / "roadwork").glob("*.jpg")) if REAL.is_dir() else []
    if files:
        return Image.open(files[0]).convert("RGB"), str(files[0])
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (270, 480, 3), dtype=np.uint8)
    return Image.fromarray(a).resize((480, 270)), "synthetic noise"


def _jpeg(im: Image.Image, size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    im.resize(size, Image.Resampling.BICUBIC).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _old(data: bytes, spec: PreprocessSpec) -> np.ndarray:
    return resize_uint8(load_rgb(data), spec)  # load_rgb without min_side: the full decode of before


def _new(data: bytes, spec: PreprocessSpec) -> np.ndarray:
    return load_resized(data, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--photo", default=None, help="a photo to upscale (default: the shared real photos)")
    args = ap.parse_args()

    src, where = _source(args.photo)
    for line in machine_lines():
        print(line)
    print(f"source photo: {where} ({src.size[0]}x{src.size[1]}), upscaled, JPEG quality 90\n")
    specs = {
        "96": PreprocessSpec(size=96),
        "224": PreprocessSpec(size=224),
        "224 (crop 0.875)": PreprocessSpec(size=224, crop_pct=0.875),
    }
    head = (
        f"{'image':>10} {'KB':>5} {'target':>17} {'decoded to':>11} {'old ms/img':>11} {'new ms/img':>11} "
        f"{'speed-up':>9} {'mean |diff|':>12}"
    )
    print(head)
    print("-" * len(head))
    for w, h in ((1920, 1080), (4000, 3000)):
        data = _jpeg(src, (w, h))
        for name, spec in specs.items():
            old_t, new_t = [], []
            _old(data, spec), _new(data, spec)  # warm-up
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                a = _old(data, spec)
                t1 = time.perf_counter()
                b = _new(data, spec)
                t2 = time.perf_counter()
                old_t.append((t1 - t0) * 1e3)
                new_t.append((t2 - t1) * 1e3)
            o, n = statistics.median(old_t), statistics.median(new_t)
            dw, dh = load_rgb(data, spec.resize_side).size
            diff = float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())
            print(
                f"{f'{w}x{h}':>10} {len(data) // 1024:>5} {name:>17} {f'{dw}x{dh}':>11} {o:>11.2f} {n:>11.2f} "
                f"{o / n:>8.1f}x {diff:>12.2f}"
            )
    _check_table(src, args.repeats)


def _check_full(path: Path) -> None:
    """The data stage's check before: read, hash, decode in full."""
    import hashlib

    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        im.load()
    hashlib.sha256(data).hexdigest()


def _check_table(src: Image.Image, repeats: int) -> None:
    """The data stage's per-file check (read, hash, decode to prove the file whole): before (full decode) vs
    now (``data.sources.check_image``: a JPEG at 1/8 scale), one process, from files on disk."""
    import tempfile

    from roadwork.data.sources import check_image

    print("\nData-stage check per file (read + sha256 + decode), one process")
    head = f"{'image':>10} {'full decode ms':>15} {'check_image ms':>15} {'speed-up':>9}"
    print(head)
    print("-" * len(head))
    with tempfile.TemporaryDirectory() as d:
        for w, h in ((1920, 1080), (4000, 3000)):
            path = Path(d) / f"{w}x{h}.jpg"
            path.write_bytes(_jpeg(src, (w, h)))
            old_t, new_t = [], []
            for _ in range(repeats):
                t0 = time.perf_counter()
                _check_full(path)
                t1 = time.perf_counter()
                digest, _ = check_image(path, max_pixels=10**9, max_bytes=2**30)
                t2 = time.perf_counter()
                assert digest is not None
                old_t.append((t1 - t0) * 1e3)
                new_t.append((t2 - t1) * 1e3)
            o, n = statistics.median(old_t), statistics.median(new_t)
            print(f"{f'{w}x{h}':>10} {o:>15.2f} {n:>15.2f} {o / n:>8.1f}x")


if __name__ == "__main__":
    main()
