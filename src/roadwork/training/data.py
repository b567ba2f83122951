"""Training images beyond RAM: a decoded-uint8 cache on disk, filled by worker processes, read per batch.

Decoding a 1080p JPEG costs milliseconds; a training step on a small model costs less per image. So every image
is decoded and resized once (the shared decode path, ``data.preprocess.load_resized``) into one flat file of
uint8 pixels, shape (N, size, size, 3), written by ``workers`` processes (``train.decode_workers``; forked on
Linux) straight into a memory map (no pixels travel through pipes). Training then reads each batch's rows with
``os.pread``: the bytes come from the page cache or the disk and are copied into the batch; nothing stays mapped,
so the process's peak RSS does not grow with the number of images (a memory map that training touched would
count every touched page in RSS).

The cache is keyed on the preprocessing (spec, decode side) and on the images: their sha256 when the caller has
them (``dataset.parquet`` does), else path, size and modification time. With ``cache_dir`` set, a second run on
the same data finds ``<key>.u8`` complete (its ``<key>.json`` is written last) and decodes nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from roadwork._parallel import process_pool, resolve_workers
from roadwork.data.preprocess import PreprocessSpec, load_resized

__all__ = ["DiskImages", "build_cache", "cache_key"]

CACHE_SCHEMA = 1
_TMP = ".tmp-"  # <key>.u8.tmp-<host>-<pid>: a build in progress


def cache_key(
    paths: Sequence[str], spec: PreprocessSpec, min_side: int | None, digests: Sequence[str] | None = None
) -> str:
    """sha256 of the preprocessing and of the images (``digests`` if given, else path + size + mtime)."""
    h = hashlib.sha256(json.dumps([CACHE_SCHEMA, spec.to_dict(), min_side, len(paths)]).encode())
    if digests is not None:
        for d in digests:
            h.update(str(d).encode() + b"\n")
    else:
        for p in paths:
            st = os.stat(p)
            h.update(f"{os.path.abspath(p)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


def _fill(
    file: str, shape: tuple[int, ...], start: int, paths: list[str], spec_d: dict[str, Any], side: int | None
) -> int:
    """Worker: decode ``paths`` into rows ``start:`` of the memory-mapped cache file."""
    spec = PreprocessSpec.from_dict(spec_d)
    mm = np.memmap(file, dtype=np.uint8, mode="r+", shape=shape)
    for i, p in enumerate(paths):
        mm[start + i] = load_resized(p, spec, side)
    mm.flush()
    del mm
    return len(paths)


class DiskImages:
    """(N, S, S, 3) uint8 images in a flat file, read by rows: ``images[idx]`` → a numpy array (a copy)."""

    def __init__(self, file: str | Path, n: int, size: int, *, owned_dir: str | None = None) -> None:
        self.file = str(file)
        self.shape = (n, size, size, 3)
        self.row = size * size * 3
        self._fd: int | None = None
        self._pid = -1
        self._owned_dir = owned_dir  # a temporary folder removed by close()

    def __len__(self) -> int:
        return self.shape[0]

    def _handle(self) -> int:
        if self._fd is None or self._pid != os.getpid():  # a forked DataLoader worker opens its own
            self._fd, self._pid = os.open(self.file, os.O_RDONLY), os.getpid()
        return self._fd

    def __getitem__(self, idx: Any) -> np.ndarray:
        if isinstance(idx, slice):
            rows = np.arange(len(self))[idx]
        else:
            rows = np.asarray(idx, dtype=np.int64).reshape(-1)
        out = np.empty((len(rows), *self.shape[1:]), np.uint8)
        flat = out.reshape(len(rows), self.row)
        fd = self._handle()
        # contiguous runs of rows are one read each (sorted batches, slices); others one read per row
        i = 0
        while i < len(rows):
            j = i + 1
            while j < len(rows) and rows[j] == rows[j - 1] + 1:
                j += 1
            buf = os.pread(fd, self.row * (j - i), int(rows[i]) * self.row)
            flat[i:j] = np.frombuffer(buf, np.uint8).reshape(j - i, self.row)
            i = j
        return out

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fd": None, "_owned_dir": None}

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._owned_dir is not None:
            import shutil

            shutil.rmtree(self._owned_dir, ignore_errors=True)
            self._owned_dir = None


def build_cache(
    paths: Sequence[str],
    spec: PreprocessSpec,
    *,
    cache_dir: str | Path | None = None,
    min_side: int | None = None,
    workers: int = 1,
    digests: Sequence[str] | None = None,
    progress: bool = False,
    desc: str = "caching images",
) -> DiskImages:
    """Decode ``paths`` once into a uint8 cache file (reused when ``cache_dir`` holds a complete one for the same
    key) and return a reader. ``workers`` > 1: that many processes decode; 0: one per core. ``cache_dir=None``:
    a temporary folder, removed by ``DiskImages.close()``."""
    from roadwork._progress import progress_bar, progress_write

    owned = None
    if cache_dir is None:
        owned = tempfile.mkdtemp(prefix="roadwork-cache-")
        root = Path(owned)
    else:
        root = Path(cache_dir)
        root.mkdir(parents=True, exist_ok=True)
    key = cache_key(paths, spec, min_side, digests)
    file, meta = root / f"{key}.u8", root / f"{key}.json"
    n, shape = len(paths), (len(paths), spec.size, spec.size, 3)
    if meta.is_file() and file.is_file() and file.stat().st_size == int(np.prod(shape)):
        if progress:
            progress_write(f"{_what(desc)}: {n} reused from {file} (decoded by an earlier run)")
        return DiskImages(file, n, spec.size, owned_dir=owned)
    _sweep_stale(root)
    tmp = root / f"{key}.u8{_TMP}{socket.gethostname()}-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.truncate(int(np.prod(shape)))
    workers, t0 = resolve_workers(workers), time.perf_counter()
    chunk = max(1, min(256, -(-n // max(1, workers * 4))))
    jobs = [(i, list(paths[i : i + chunk])) for i in range(0, n, chunk)]
    procs = min(workers, len(jobs)) if workers > 1 and n > chunk else 1
    bar = progress_bar(total=n, desc=desc, unit="img", leave=False, disable=not progress)
    try:
        if procs == 1:
            for start, part in jobs:
                bar.update(_fill(str(tmp), shape, start, part, spec.to_dict(), min_side))
        else:
            with process_pool(procs) as pool:
                futures = [
                    pool.submit(_fill, str(tmp), shape, s, part, spec.to_dict(), min_side) for s, part in jobs
                ]
                for fut in futures:
                    bar.update(fut.result())
    except BaseException:  # an unreadable image, Ctrl-C: no half-written cache is left behind
        tmp.unlink(missing_ok=True)
        if owned is not None:
            import shutil

            shutil.rmtree(owned, ignore_errors=True)
        raise
    finally:
        bar.close()
    os.replace(tmp, file)
    meta.write_text(
        json.dumps({"schema": CACHE_SCHEMA, "n": n, "spec": spec.to_dict(), "min_side": min_side})
    )
    if progress:
        took = time.perf_counter() - t0
        progress_write(f"{_what(desc)}: {n} decoded in {took:.1f} s ({procs} process(es)) into {file}")
    return DiskImages(file, n, spec.size, owned_dir=owned)


def _what(desc: str) -> str:
    """'decoding train images' → 'train images': the subject of the one line a build prints."""
    return desc.removeprefix("decoding ")


def _sweep_stale(root: Path) -> None:
    """Remove the temporary files of cache builds on this host whose process is gone (killed by a signal or
    the OOM killer: no ``except`` ran); a build still running keeps its file."""
    host = socket.gethostname()
    for f in root.glob(f"*{_TMP}{host}-*"):
        pid = f.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)  # signal 0: does the process exist?
        except ProcessLookupError:
            f.unlink(missing_ok=True)
        except PermissionError:  # another user's live process
            pass
