"""Synthetic scene generation speed: images per second per core, at several sizes.

    python benchmarks/synthetic_throughput.py [--n 400]

Prints one table. The spine's acceptance line: at least 100 images/s per core at 128 px.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from roadwork.config import SyntheticConfig
from roadwork.data.synthetic import generate_dataset, iter_scenes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=400, help="images per measurement")
    args = ap.parse_args()
    rows = []
    for size in (64, 128, 256):
        t0 = time.perf_counter()
        for _ in iter_scenes(args.n, size=size, seed=0):
            pass
        render = args.n / (time.perf_counter() - t0)
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            generate_dataset(d, SyntheticConfig(n=args.n, size=size, workers=1), progress=False)
            one = args.n / (time.perf_counter() - t0)
        rows.append((size, render, one))
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        generate_dataset(d, SyntheticConfig(n=4 * args.n, size=128, workers=cores), progress=False)
        all_cores = 4 * args.n / (time.perf_counter() - t0)
    print("| size px | render only, 1 core (img/s) | render + JPEG write, 1 core (img/s) |")
    print("|---:|---:|---:|")
    for size, render, one in rows:
        print(f"| {size} | {render:.0f} | {one:.0f} |")
    print(
        f"\n128 px with {cores} worker processes (spawn + write): {all_cores:.0f} img/s "
        f"({all_cores / cores:.0f} img/s per core)"
    )


if __name__ == "__main__":
    main()
