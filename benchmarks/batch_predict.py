"""Batch prediction throughput: roadwork's local engine vs Ray Data (2 CPUs) vs a plain ONNX Runtime loop,
on the same bundle and the same generated images, side by side in one run.

    python benchmarks/batch_predict.py [runs/demo/export/bundle] [--n 5000] [--batch 64]

The plain loop decodes, preprocesses and runs the model's ONNX file with no policy, no cascade and no output
file: the floor a hand-written script would reach. roadwork's engines run the full policy (calibration,
conformal set, abstention, cascade) and write a Parquet dataset; Ray pays for starting a cluster and its
actors. The last line checks that local and Ray outputs are identical.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from roadwork.data.preprocess import load_rgb, preprocess
from roadwork.data.synthetic import generate_dataset
from roadwork.export.bundle import Bundle
from roadwork.export.onnx import onnx_logits, onnx_session
from roadwork.scale.batch import identical, predict_local, predict_ray, read_predictions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", nargs="?", default="runs/demo/export/bundle")
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    import ray

    from roadwork.config import SyntheticConfig

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        rows = generate_dataset(d / "images", SyntheticConfig(n=args.n, seed=123, workers=2), progress=False)
        items = pd.DataFrame({"path": [str(d / "images" / Path(str(r["path"])).name) for r in rows]})
        results: dict[str, float] = {}

        bundle = Bundle.load(args.bundle)
        session = onnx_session(Path(args.bundle) / "model.onnx")
        t0 = time.perf_counter()
        for i in range(0, len(items), args.batch):
            ims = [load_rgb(p) for p in items["path"][i : i + args.batch]]
            np.argmax(onnx_logits(session, preprocess(ims, bundle.card.preprocess)), axis=1)
        results["plain ONNX Runtime loop (model only)"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        predict_local(args.bundle, items, d / "local", batch_size=args.batch, progress=False)
        results["roadwork engine=local"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        started = time.perf_counter() - t0
        predict_ray(args.bundle, items, d / "ray", batch_size=args.batch, actors=2)
        results["roadwork engine=ray (2 actors)"] = time.perf_counter() - t0
        ray.shutdown()
        same = identical(
            read_predictions(d / "local"), read_predictions(d / "ray")[read_predictions(d / "local").columns]
        )

    base = results["plain ONNX Runtime loop (model only)"]
    t = Table(title=f"batch prediction of {args.n} generated images (batch {args.batch})")
    for col in ("engine", "seconds", "images/s", "vs plain loop"):
        t.add_column(col, justify="left" if col == "engine" else "right")
    for name, s in results.items():
        t.add_row(name, f"{s:.1f}", f"{args.n / s:.0f}", f"{base / s:.2f}x")
    console = Console(width=120)
    console.print(t)
    console.print(
        f"Ray cluster start: {started:.1f} s of the Ray row. Local and Ray outputs identical: {same}"
    )


if __name__ == "__main__":
    main()
