"""The server's event loop: uvloop (what the ``serve`` extra installs and the server picks) against asyncio's own
(what a bare ``uvicorn`` gives), side by side, rounds alternating.

    pip install -e '.[serve]'
    python benchmarks/serve_loop.py --bundle runs/demo/export/bundle [--rounds 3] [--rate 560] [--seconds 10]

Each round starts a fresh server per loop (asyncio's by hiding uvloop from the server process, as if it were not
installed) and measures: 1 closed-loop client (p50/p99), 16 closed-loop clients (capacity), and Poisson arrivals at
``--rate`` requests/s for ``--seconds`` (p50/p99, 503s). ``/v1/classify``, JSON base64 96 px JPEGs; client and
server share the machine's cores. Prints one row per round and loop, then the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _chaos_ring2 import _open_loop  # noqa: E402
from _machine import bundle_or_exit, machine_lines  # noqa: E402
from serve_chaos import Server, _closed_loop, _jpeg_bodies  # noqa: E402

HEADER = "| 1 client p50 ms | p99 ms | 16 clients req/s | open loop p50 ms | p99 ms | 503 |"


def _round(
    bundle: Path, bodies: list[bytes], rate: float, seconds: float, hide: str | None
) -> tuple[float, ...]:
    before = os.environ.get("PYTHONPATH")
    if hide is not None:  # a sitecustomize that makes 'import uvloop' fail in the server process
        os.environ["PYTHONPATH"] = os.pathsep.join([hide, *([before] if before else [])])
    try:
        server = Server(bundle)
    finally:
        if before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before
    try:
        asyncio.run(_closed_loop(server.port, bodies, 2, 8))  # warm-up
        one = asyncio.run(_closed_loop(server.port, bodies, 4, 1))
        cap = asyncio.run(_closed_loop(server.port, bodies, 8, 16))
        ol = asyncio.run(_open_loop(server.port, bodies, rate, seconds))
    finally:
        server.stop()
    return one["p50"], one["p99"], cap["rps"], ol["p50"], ol["p99"], ol["codes"].get("503", 0)


def _cells(row: tuple[float, ...]) -> str:
    return " | ".join(f"{v:.0f}" if i in (2, 5) else f"{v:.1f}" for i, v in enumerate(row))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default="runs/demo/export/bundle")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--rate", type=float, default=560.0, help="open-loop arrivals per second (about 0.8x capacity)"
    )
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args()
    bundle = bundle_or_exit(args.bundle)
    for line in machine_lines():
        print(line)
    bodies = _jpeg_bodies(32)
    rows: dict[str, list[tuple[float, ...]]] = {"uvloop": [], "asyncio": []}
    with tempfile.TemporaryDirectory() as hide:
        Path(hide, "sitecustomize.py").write_text("import sys\nsys.modules['uvloop'] = None\n")
        print(f"\n| round | loop {HEADER}\n|---:|---|---:|---:|---:|---:|---:|---:|")
        for r in range(args.rounds):
            for name in rows:
                row = _round(bundle, bodies, args.rate, args.seconds, hide if name == "asyncio" else None)
                rows[name].append(row)
                print(f"| {r + 1} | {name} | {_cells(row)} |", flush=True)
    print(f"\nMedians over the rounds ({args.rate:g} req/s open loop):\n")
    print(f"| loop {HEADER}\n|---|---:|---:|---:|---:|---:|---:|")
    for name, rs in rows.items():
        print(f"| {name} | {_cells(tuple(statistics.median(c) for c in zip(*rs, strict=True)))} |")


if __name__ == "__main__":
    main()
