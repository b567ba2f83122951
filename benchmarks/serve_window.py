"""The batching window at low load: fixed (``max_queue_delay_ms``, the default) against ``adaptive_window=true``
(the window also closes when nothing is on its way), side by side, rounds alternating.

    pip install -e '.[serve]'
    python benchmarks/serve_window.py --bundle runs/demo/export/bundle [--rounds 3] [--seconds 4]

Closed-loop clients (1 and 4) on ``/v1/classify`` (JSON base64 JPEG) against a fresh server per round; client and
server share the machine's cores. Prints one row per round and setting, then the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _machine import bundle_or_exit, machine_lines  # noqa: E402
from serve_chaos import Server, _closed_loop, _jpeg_bodies  # noqa: E402

SETTINGS = {"fixed window": [], "adaptive_window=true": ["adaptive_window=true"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default="runs/demo/export/bundle")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=4.0)
    args = ap.parse_args()
    bundle = bundle_or_exit(args.bundle)
    for line in machine_lines():
        print(line)
    bodies = _jpeg_bodies(32)
    rows: dict[str, list[tuple[float, ...]]] = {k: [] for k in SETTINGS}
    print("\n| round | setting | 1 client p50 ms | p99 ms | req/s | 4 clients p50 ms | p99 ms | req/s |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in range(args.rounds):
        for name, settings in SETTINGS.items():
            server = Server(bundle, *settings)
            try:
                asyncio.run(_closed_loop(server.port, bodies, 1, 1))  # warm-up
                one = asyncio.run(_closed_loop(server.port, bodies, args.seconds, 1))
                four = asyncio.run(_closed_loop(server.port, bodies, args.seconds, 4))
            finally:
                server.stop()
            row = (one["p50"], one["p99"], one["rps"], four["p50"], four["p99"], four["rps"])
            rows[name].append(row)
            print(
                f"| {r + 1} | {name} | "
                + " | ".join(f"{v:.1f}" if i % 3 != 2 else f"{v:.0f}" for i, v in enumerate(row))
                + " |"
            )
    print("\nMedians over the rounds:\n")
    print("| setting | 1 client p50 ms | p99 ms | req/s | 4 clients p50 ms | p99 ms | req/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, rs in rows.items():
        med = [statistics.median(col) for col in zip(*rs, strict=True)]
        print(
            f"| {name} | "
            + " | ".join(f"{v:.1f}" if i % 3 != 2 else f"{v:.0f}" for i, v in enumerate(med))
            + " |"
        )


if __name__ == "__main__":
    main()
