"""Serving throughput, latency and overload behaviour, measured side by side in one run.

    pip install -e '.[train,serve]' litserve httpx
    python benchmarks/serve_load.py [--bundle runs/demo/export/bundle] [--seconds 20] [--concurrency 16]
    python benchmarks/serve_load.py --photo-size 1920x1080 [--images DIR]    # full-size photos only

With ``--photo-size WxH`` (real photos from ``../shared/data/real-roadwork-mini``, or ``--images DIR``, upscaled
to WxH, JPEG quality 90) or ``--images DIR`` alone (the files as they are), only the photo table runs: the same
server on the same bodies, with today's decode (JPEG DCT-scaled to the bundle's decode side, then resized) and
with the old one (full decode, then resize; ``benchmarks/_serve_old_decode.py`` patches it in that server
process only), rounds alternating old/new, plus both decodes in process.

Tables (this machine; client and server share its cores, for every row alike):
1. model formats on a ViT-S/14 at 224 px (random weights, 2 classes): torch eager, ONNX Runtime fp32 and
   int8 (dynamic), img/s at batch 8;
2. serving the demo bundle: in-process decode + preprocess + ORT, the roadwork server and LitServe serving the
   same ONNX file with the same batch settings, all fed JSON ``{"image": base64 JPEG}`` at the same concurrency;
3. serving the ViT-S bundle: the roadwork server vs in-process ORT;
4. overload: an open-loop client at 3x the sustainable rate for --overload-seconds; every request must be
   answered 200 or 503, and the p99 latency of accepted requests is compared with an open-loop run at half
   the sustainable rate.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _jpegs(n: int, size: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
            buf, format="JPEG", quality=90
        )
        out.append(buf.getvalue())
    return out


REAL = HERE.parents[1] / "shared" / "data" / "real-roadwork-mini"


def _photo_jpegs(n: int, images: str | None, size: tuple[int, int] | None) -> tuple[list[bytes], str]:
    """``n`` JPEGs: the files of ``images`` (or the shared real photos) as they are, or upscaled to ``size``."""
    root = Path(images) if images else REAL
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    if not files:
        sys.exit(f"no JPEGs under {root}: pass --images DIR")
    step = max(1, len(files) // n)
    files = files[::step][:n]
    out = []
    for f in files:
        if size is None:
            out.append(f.read_bytes())
            continue
        buf = io.BytesIO()
        Image.open(f).convert("RGB").resize(size, Image.Resampling.BICUBIC).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    what = f"{len(out)} JPEGs from {root}" + (f", upscaled to {size[0]}x{size[1]}" if size else "")
    return out, what


def _in_process_decode(bundle_dir: Path, jpegs: list[bytes], seconds: float, batch: int, old: bool) -> float:
    """decode + preprocess + ORT + policy in this process; ``old``: full decode, else the bundle's decode side."""
    from roadwork.data.preprocess import load_rgb, preprocess
    from roadwork.export.bundle import Bundle
    from roadwork.export.onnx import onnx_logits

    b = Bundle.load(bundle_dir)
    side = None if old else _decode_side(bundle_dir)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        chunk = [jpegs[(n + i) % len(jpegs)] for i in range(batch)]
        x = preprocess([load_rgb(j, side) for j in chunk], b.card.preprocess)
        b.policy.apply(onnx_logits(b.session, x))
        n += batch
    return n / (time.perf_counter() - t0)


def _decode_side(bundle_dir: Path) -> int:
    from roadwork.export.bundle import Bundle

    b = Bundle.load(bundle_dir)
    return int(getattr(b, "decode_side", None) or b.card.preprocess.resize_side)


def _photo_table(args: argparse.Namespace, bundle: Path) -> None:
    size = tuple(int(v) for v in args.photo_size.lower().split("x")) if args.photo_size else None
    jpegs, what = _photo_jpegs(32, args.images, size)  # type: ignore[arg-type]
    bodies = [json.dumps({"image": base64.b64encode(j).decode()}).encode() for j in jpegs]
    kb = np.mean([len(j) for j in jpegs]) / 1024
    print(f"photos: {what}; mean {kb:.0f} KB; bundle decode side {_decode_side(bundle)} px")
    print(
        f"rounds: {args.rounds} x {args.seconds:g} s per server, old and new alternating; best round kept\n"
    )
    rows: dict[str, list[dict[str, float]]] = {"new": [], "old": []}
    inproc = {
        k: _in_process_decode(bundle, jpegs, args.seconds / 2, args.batch, k == "old") for k in ("old", "new")
    }
    for _ in range(args.rounds):
        for which in ("old", "new"):
            port = _port()
            proc = _roadwork_server(bundle, port, args.batch, old_decode=which == "old")
            try:
                _wait_ready(f"http://127.0.0.1:{port}/v2/health/ready", proc)
                url = f"http://127.0.0.1:{port}/v1/classify"
                asyncio.run(_closed_loop(url, bodies, 2, args.concurrency))  # warm-up
                rows[which].append(asyncio.run(_closed_loop(url, bodies, args.seconds, args.concurrency)))
            finally:
                _stop(proc)
    best = {k: max(v, key=lambda r: r["rps"]) for k, v in rows.items()}
    print(f"Serving the demo bundle on full-size photos, JSON base64 JPEG, concurrency {args.concurrency}\n")
    print(
        "| path | decode | img/s | p50 ms | p99 ms | non-200 | new / old |\n|---|---|---:|---:|---:|---:|---:|"
    )
    for which, label in (("old", "full decode, then resize"), ("new", "DCT-scaled to the decode side")):
        r = best[which]
        ratio = f"{r['rps'] / best['old']['rps']:.2f}x" if which == "new" else ""
        print(
            f"| roadwork serve | {label} | {r['rps']:.1f} | {r['p50']:.1f} | {r['p99']:.1f} | "
            f"{', '.join(f'{c}: {k}' for c, k in r['codes'].items()) or 0} "
            f"| {ratio} |"
        )
    for which, label in (("old", "full decode, then resize"), ("new", "DCT-scaled to the decode side")):
        ratio = f"{inproc['new'] / inproc['old']:.2f}x" if which == "new" else ""
        print(
            f"| in-process decode + preprocess + ORT + policy | {label} | {inproc[which]:.1f} | | | | {ratio} |"
        )
    every = ", ".join(f"{k}: " + " ".join(f"{r['rps']:.1f}" for r in v) for k, v in rows.items())
    print(f"\nevery round (img/s): {every}")


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    import httpx

    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(
                f"server exited with {proc.returncode}; see its log under {tempfile.gettempdir()}"
            )
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout}s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop the server and every process it started (LitServe's workers outlive a plain terminate)."""
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


_POOL: dict[tuple[str, int], list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]] = {}


async def _post(host: str, port: int, path: str, body: bytes) -> int:
    """One HTTP/1.1 POST over a pooled keep-alive loopback connection; returns the status. A bare client, so
    that the load generator (which shares the cores with the server) spends little CPU per request. A pooled
    connection the server has meanwhile closed fails before any answer: the request is sent again on a fresh
    one, as HTTP clients do."""
    pool = _POOL.setdefault((host, port), [])
    if pool:
        try:
            return await _post_on(pool.pop(), pool, host, path, body)
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
            pass
    return await _post_on(await asyncio.open_connection(host, port), pool, host, path, body)


async def _post_on(conn, pool, host: str, path: str, body: bytes) -> int:  # type: ignore[no-untyped-def]
    reader, writer = conn
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    try:
        writer.write(head + body)
        await writer.drain()
        status_line = await reader.readline()
        if not status_line:
            raise asyncio.IncompleteReadError(b"", None)  # closed before answering: a stale pooled connection
        length, keep = 0, True
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
            elif name.lower() == "connection" and "close" in value.lower():
                keep = False
        await reader.readexactly(length)
    except (OSError, asyncio.IncompleteReadError):
        writer.close()
        raise
    if keep:
        pool.append((reader, writer))
    else:
        writer.close()
    return int(status_line.split()[1])


async def _closed_loop(url: str, bodies: list[bytes], seconds: float, concurrency: int) -> dict[str, float]:
    """``concurrency`` clients, each sending the next request as soon as the last one is answered."""
    host, port, path = _split(url)
    lat: list[float] = []
    codes: dict[int, int] = {}
    stop = time.perf_counter() + seconds

    async def worker(i: int) -> None:
        k = i
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            code = await _post(host, port, path, bodies[k % len(bodies)])
            codes[code] = codes.get(code, 0) + 1
            if code == 200:
                lat.append(time.perf_counter() - t0)
            k += concurrency

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    wall = time.perf_counter() - t0
    for _r, w in _POOL.pop((host, port), []):
        w.close()
    a = np.array(lat) * 1000
    return {
        "rps": len(lat) / wall,
        "p50": float(np.percentile(a, 50)),
        "p99": float(np.percentile(a, 99)),
        "errors": sum(v for k, v in codes.items() if k != 200),
        "codes": {k: v for k, v in sorted(codes.items()) if k != 200},  # type: ignore[dict-item]
    }


def _split(url: str) -> tuple[str, int, str]:
    hostport, _, path = url.removeprefix("http://").partition("/")
    host, _, port = hostport.partition(":")
    return host, int(port), "/" + path


async def _open_loop(url: str, bodies: list[bytes], seconds: float, rate: float) -> dict[str, float]:
    """Requests sent at a fixed rate whatever the answers: the way overload really arrives."""
    host, port, path = _split(url)
    lat: list[float] = []
    codes: dict[str, int] = {}

    async def one(k: int) -> None:
        t0 = time.perf_counter()
        try:
            code = await _post(host, port, path, bodies[k % len(bodies)])
            key = str(code)
            if code == 200:
                lat.append(time.perf_counter() - t0)
        except (OSError, asyncio.IncompleteReadError) as e:
            key = type(e).__name__
        codes[key] = codes.get(key, 0) + 1

    tasks = []
    t0 = time.perf_counter()
    k = 0
    while (now := time.perf_counter() - t0) < seconds:
        due = k / rate
        if due > now:
            await asyncio.sleep(due - now)
        tasks.append(asyncio.create_task(one(k)))
        k += 1
    await asyncio.gather(*tasks)
    for _r, w in _POOL.pop((host, port), []):
        w.close()
    a = np.array(lat) * 1000 if lat else np.array([np.nan])
    return {
        "sent": k,
        "ok": codes.get("200", 0),
        "503": codes.get("503", 0),
        "other": sum(v for c, v in codes.items() if c not in ("200", "503")),
        "p50": float(np.percentile(a, 50)),
        "p99": float(np.percentile(a, 99)),
    }


def _in_process(
    bundle_dir: Path, jpegs: list[bytes], seconds: float, batch: int, served: bool = True
) -> float:
    """In this process, batches of ``batch``: the ceiling for a server. ``served``: what the server computes for
    each image (decode to the bundle's decode side, then the bundle's whole served path: cascade and policy);
    else decode + preprocess + the last model + its policy alone (what this table compared before 2026-12-06,
    less work than the server does when the bundle has a cascade)."""

    from roadwork.data.preprocess import load_rgb, preprocess
    from roadwork.export.bundle import Bundle
    from roadwork.export.onnx import onnx_logits

    b = Bundle.load(bundle_dir)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        chunk = [jpegs[(n + i) % len(jpegs)] for i in range(batch)]
        if served:
            b.predict_images([load_rgb(j, b.decode_side) for j in chunk])
        else:
            x = preprocess([load_rgb(j) for j in chunk], b.card.preprocess)
            b.tensor_policy.apply(onnx_logits(b.session, x))
        n += batch
    return n / (time.perf_counter() - t0)


def _roadwork_server(
    bundle_dir: Path, port: int, batch: int, extra: list[str] | None = None, *, old_decode: bool = False
) -> subprocess.Popen[bytes]:
    entry = [str(HERE / "_serve_old_decode.py")] if old_decode else ["-m", "roadwork.cli"]
    cmd = [
        sys.executable,
        *entry,
        "serve",
        str(bundle_dir),
        f"port={port}",
        f"max_batch_size={batch}",
        "max_queue_delay_ms=5",
        *(extra or []),
    ]
    return subprocess.Popen(
        cmd, stdout=_log(f"roadwork-{port}"), stderr=subprocess.STDOUT, start_new_session=True
    )


def _log(name: str):  # type: ignore[no-untyped-def]
    """Server output goes to a file: an unread pipe fills up and blocks the server."""
    return open(Path(tempfile.gettempdir()) / f"{name}.log", "wb")


def _litserve_server(bundle_dir: Path, port: int, batch: int) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, str(HERE / "_litserve_app.py"), str(bundle_dir), str(port), str(batch)]
    return subprocess.Popen(
        cmd, stdout=_log(f"litserve-{port}"), stderr=subprocess.STDOUT, start_new_session=True
    )


def _vit_bundle(out: Path, demo_bundle: Path) -> Path:
    """A ViT-S/14 at 224 px with random weights, exported like the pipeline exports, with the demo's policy."""
    import timm
    import torch

    from roadwork.data.preprocess import PreprocessSpec
    from roadwork.export.bundle import write_bundle
    from roadwork.export.onnx import export_onnx
    from roadwork.models.factory import ModelCard
    from roadwork.trust.policy import TrustPolicy

    torch.manual_seed(0)
    name = "vit_small_patch14_dinov2"
    model = timm.create_model(name, pretrained=False, num_classes=2, img_size=224).eval()
    x = np.random.default_rng(0).normal(size=(2, 3, 224, 224)).astype(np.float32)
    onnx_path = out / "vit.onnx"
    export_onnx(model, x, onnx_path)
    card = ModelCard(
        backbone=name,
        classes=["no_roadwork", "roadwork"],
        preprocess=PreprocessSpec(size=224),
        kwargs={"img_size": 224},
    )
    # the demo's model-alone policy (no cascade: this bundle has no earlier stages to ship)
    alone = demo_bundle / "policy-model.json"
    policy = TrustPolicy.load(alone if alone.is_file() else demo_bundle / "policy.json")
    if policy.cascade is not None:
        import dataclasses

        policy = dataclasses.replace(policy, cascade=None)
    write_bundle(
        out / "vit-bundle", onnx_path=onnx_path, card=card, policy=policy, export_info={"bench": True}
    )
    return out / "vit-bundle", model  # type: ignore[return-value]


def _formats_table(model, onnx_path: Path, tmp: Path, seconds: float) -> list[tuple[str, float]]:  # type: ignore[no-untyped-def]
    import onnxruntime as ort
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    x = np.random.default_rng(1).normal(size=(8, 3, 224, 224)).astype(np.float32)

    def rate(fn) -> float:  # type: ignore[no-untyped-def]
        fn()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            fn()
            n += len(x)
        return n / (time.perf_counter() - t0)

    rows = []
    with torch.inference_mode():
        xt = torch.from_numpy(x)
        rows.append(("torch eager fp32", rate(lambda: model(xt))))
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    rows.append(("ONNX Runtime fp32", rate(lambda: sess.run(None, {"input": x}))))
    q = tmp / "vit-int8.onnx"
    quantize_dynamic(str(onnx_path), str(q), weight_type=QuantType.QInt8)
    sq = ort.InferenceSession(str(q), providers=["CPUExecutionProvider"])
    rows.append(("ONNX Runtime int8 (dynamic)", rate(lambda: sq.run(None, {"input": x}))))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default="runs/demo/export/bundle")
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--overload-seconds", type=float, default=30)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument(
        "--max-queue", type=int, default=6, help="the server's admission bound in the overload run"
    )
    ap.add_argument(
        "--max-queue-wait-ms",
        type=float,
        default=10.0,
        help="the server's queue-wait budget in the overload run (0: none); later requests get 503",
    )
    ap.add_argument("--skip-vit", action="store_true")
    ap.add_argument(
        "--images", default=None, help="a folder of JPEGs: the photo table only (old vs new decode)"
    )
    ap.add_argument(
        "--photo-size", default=None, help="WxH, e.g. 1920x1080: photos upscaled to it (photo table)"
    )
    ap.add_argument("--rounds", type=int, default=2, help="photo table: old/new rounds, alternating")
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    from _machine import bundle_or_exit, machine_lines

    bundle = bundle_or_exit(args.bundle)
    if args.images or args.photo_size:
        for line in machine_lines():
            print(line)
        print(f"bundle {bundle}; batch {args.batch}")
        _photo_table(args, bundle)
        return
    import httpx  # noqa: F401  (fail early with a clear ImportError)

    from roadwork.export.bundle import Bundle

    size = Bundle.load(bundle).card.preprocess.size
    jpegs = _jpegs(64, size)
    bodies = [json.dumps({"image": base64.b64encode(j).decode()}).encode() for j in jpegs]
    tmp = Path(tempfile.mkdtemp(prefix="roadwork-bench-"))
    print(
        f"machine: {os.cpu_count()} cores; bundle {bundle} ({size} px); concurrency {args.concurrency}; "
        f"batch {args.batch}; {args.seconds:g} s per row\n"
    )
    try:
        if not args.skip_vit:
            vit_bundle, vit = _vit_bundle(tmp, bundle)
            fmt = _formats_table(vit, vit_bundle / "model.onnx", tmp, args.seconds / 2)
            base = fmt[0][1]
            print("Model formats, ViT-S/14 @ 224, batch 8 (img/s)\n")
            print("| format | img/s | vs torch eager |\n|---|---:|---:|")
            for name, r in fmt:
                print(f"| {name} | {r:.1f} | {r / base:.2f}x |")
            print()

        rows = []
        alone = _in_process(bundle, jpegs, args.seconds, args.batch, served=False)
        rows.append(
            ("in-process: decode + the last model + its policy", alone, float("nan"), float("nan"), 0)
        )
        inproc = _in_process(bundle, jpegs, args.seconds, args.batch)
        rows.append(
            ("in-process: decode + the served path (cascade + policy)", inproc, *[float("nan")] * 2, 0)
        )
        results = {}
        for name, start in (("roadwork serve", _roadwork_server), ("LitServe", _litserve_server)):
            port = _port()
            proc = start(bundle, port, args.batch)
            try:
                health = f"http://127.0.0.1:{port}" + (
                    "/v2/health/ready" if name.startswith("roadwork") else "/health"
                )
                _wait_ready(health, proc)
                path = "/v1/classify" if name.startswith("roadwork") else "/predict"
                url = f"http://127.0.0.1:{port}{path}"
                asyncio.run(_closed_loop(url, bodies, 2, args.concurrency))  # warm-up
                r = asyncio.run(_closed_loop(url, bodies, args.seconds, args.concurrency))
                results[name] = r
                rows.append((name, r["rps"], r["p50"], r["p99"], r["errors"]))
            finally:
                _stop(proc)
        print(f"Serving the demo bundle, JSON base64 JPEG, concurrency {args.concurrency}\n")
        print("| server | img/s | p50 ms | p99 ms | non-200 | ratio |\n|---|---:|---:|---:|---:|---|")
        for name, rps, p50, p99, err in rows:
            note = ""
            if name == "roadwork serve":
                note = (
                    f"{rps / results['LitServe']['rps']:.2f}x LitServe, {rps / inproc:.2f}x in-process (same "
                    f"path), {rps / alone:.2f}x the last model alone"
                )
            print(f"| {name} | {rps:.1f} | {p50:.1f} | {p99:.1f} | {err} | {note} |")
        print()

        if not args.skip_vit:
            vin = _in_process(vit_bundle, _jpegs(32, 224), args.seconds, args.batch)
            vbodies = [json.dumps({"image": base64.b64encode(j).decode()}).encode() for j in _jpegs(32, 224)]
            port = _port()
            proc = _roadwork_server(vit_bundle, port, args.batch)
            try:
                _wait_ready(f"http://127.0.0.1:{port}/v2/health/ready", proc)
                url = f"http://127.0.0.1:{port}/v1/classify"
                asyncio.run(_closed_loop(url, vbodies, 3, args.concurrency))
                vr = asyncio.run(_closed_loop(url, vbodies, args.seconds, args.concurrency))
            finally:
                _stop(proc)
            print(f"Serving ViT-S/14 @ 224, concurrency {args.concurrency}\n")
            print("| server | img/s | p50 ms | p99 ms | ratio |\n|---|---:|---:|---:|---|")
            print(f"| in-process decode + preprocess + ORT + policy | {vin:.2f} | | | |")
            print(
                f"| roadwork serve | {vr['rps']:.2f} | {vr['p50']:.0f} | {vr['p99']:.0f} | "
                f"{vr['rps'] / vin:.2f}x in-process |\n"
            )

        sustainable = results["roadwork serve"]["rps"]
        port = _port()
        proc = _roadwork_server(
            bundle,
            port,
            args.batch,
            [f"max_queue={args.max_queue}", f"max_queue_wait_ms={args.max_queue_wait_ms}"],
        )
        try:
            _wait_ready(f"http://127.0.0.1:{port}/v2/health/ready", proc)
            url = f"http://127.0.0.1:{port}/v1/classify"
            half = asyncio.run(_open_loop(url, bodies, args.seconds, 0.5 * sustainable))
            over = asyncio.run(_open_loop(url, bodies, args.overload_seconds, 3 * sustainable))
            import httpx as _h

            alive = _h.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=5).status_code == 200
        finally:
            _stop(proc)
        print(
            f"Overload: open loop, max_queue={args.max_queue} requests, max_queue_wait_ms={args.max_queue_wait_ms:g} "
            f"(sustainable ≈ {sustainable:.0f} img/s)\n"
        )
        print("| load | rate/s | sent | 200 | 503 | other | p50 ms | p99 ms (accepted) |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for label, rate, r in (("0.5x", 0.5 * sustainable, half), ("3x", 3 * sustainable, over)):
            print(
                f"| {label} | {rate:.0f} | {r['sent']} | {r['ok']} | {r['503']} | {r['other']} | "
                f"{r['p50']:.1f} | {r['p99']:.1f} |"
            )
        print(
            f"\noverload p99 / half-load p99 = {over['p99'] / half['p99']:.2f} (target < 2); "
            f"server ready afterwards: {alive}"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
