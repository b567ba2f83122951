"""Cascade cost vs the largest stage alone, measured side by side in one run on the same decoded test images.

    python benchmarks/cascade_cost.py [runs/demo] [--batch 32] [--repeats 5]

Reads a finished run with a cascade (``roadwork demo`` builds one), loads its bundle and decodes the test
split once (decoding is the same for every row of the table, so it is left out). Then, in batches of
``--batch`` as the server would, it times each stage alone and the cascade — which sends only the images an
earlier stage did not answer to the next one — alternating them ``--repeats`` times (this machine is shared
and noisy) and keeping each row's median. Accuracy is on the whole test split. The last line checks that the
bundle's cascade answers exactly as the in-process evaluation (``metrics.json``) did.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from roadwork.data.preprocess import load_rgb
from roadwork.export.bundle import Bundle


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", nargs="?", default="runs/demo")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    run = Path(args.run)
    bundle = Bundle.load(run / "export" / "bundle")
    cascade = bundle.policy.cascade
    if cascade is None or bundle.stage_runners is None:
        raise SystemExit(f"{run} has no cascade; run it with cascade.enabled=true (the demo preset does).")
    df = pd.read_parquet(run / "data" / "dataset.parquet")
    test = df[df["split"] == "test"]
    classes = bundle.classes
    y = test["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    paths = [p if Path(p).is_absolute() else str(run / "data" / p) for p in test["path"]]
    images = [load_rgb(p) for p in paths]
    n, b = len(images), args.batch
    batches = [images[i : i + b] for i in range(0, n, b)]

    def stage_alone(s: int):  # type: ignore[no-untyped-def]
        if s < len(bundle.stage_runners):  # type: ignore[arg-type]
            runner = bundle.stage_runners[s]  # type: ignore[index]
            cal = cascade.stages[s].calibrator
            return lambda ims: cal.predict_proba(runner.logits(ims, batch_size=b)).argmax(1), None
        return lambda ims: bundle.policy.apply(bundle.logits(ims, batch_size=b)).pred, None

    def run_cascade(ims):  # type: ignore[no-untyped-def]
        out = bundle.predict_images(ims)
        return out.pred, out.stage

    rows = {st.name: stage_alone(s)[0] for s, st in enumerate(cascade.stages)}
    rows["cascade"] = run_cascade
    times: dict[str, list[float]] = {k: [] for k in rows}
    preds: dict[str, np.ndarray] = {}
    stage_of = np.zeros(n, int)
    for fn in rows.values():  # warm-up
        fn(batches[0])
    for _ in range(args.repeats):
        for name, fn in rows.items():
            outs = []
            t0 = time.perf_counter()
            for chunk in batches:
                outs.append(fn(chunk))
            times[name].append((time.perf_counter() - t0) * 1000 / n)
            if name == "cascade":
                preds[name] = np.concatenate([o[0] for o in outs])
                stage_of = np.concatenate([o[1] for o in outs])
            else:
                preds[name] = np.concatenate(outs)
    largest = cascade.stages[-1].name
    ms = {k: float(np.median(v)) for k, v in times.items()}
    share = np.bincount(stage_of, minlength=len(cascade.stages)) / n
    t = Table(title=f"cascade vs its largest stage ({n} test images, batch {b}, median of {args.repeats})")
    for col in ("configuration", "stage mix", "accuracy", "ms/img", "img/s", "cost vs largest"):
        t.add_column(col, justify="left" if col in ("configuration", "stage mix") else "right")
    for name in rows:
        mix = (
            " / ".join(f"{st.name} {x:.1%}" for st, x in zip(cascade.stages, share, strict=True))
            if name == "cascade"
            else f"{name} 100%"
        )
        acc = float((preds[name] == y).mean())
        t.add_row(
            name if name != "cascade" else f"cascade (gate {cascade.threshold:.4f})",
            mix,
            f"{acc:.4f}",
            f"{ms[name]:.4f}",
            f"{1000 / ms[name]:.0f}",
            f"{ms[name] / ms[largest]:.1%}",
        )
    console = Console()
    console.print(t)
    acc_c, acc_l = float((preds["cascade"] == y).mean()), float((preds[largest] == y).mean())
    console.print(
        f"accuracy change vs {largest} alone: {100 * (acc_c - acc_l):+.2f} points; "
        f"cost ratio {ms['cascade'] / ms[largest]:.1%}"
    )
    metrics = json.loads((run / "evaluate" / "metrics.json").read_text()).get("cascade")
    if metrics:
        console.print(
            f"in-process evaluation (metrics.json): accuracy {metrics['accuracy']:.4f}, stage share "
            + ", ".join(f"{k} {v:.1%}" for k, v in metrics["stage_share"].items())
            + f" — bundle: accuracy {acc_c:.4f}, "
            + ", ".join(f"{st.name} {x:.1%}" for st, x in zip(cascade.stages, share, strict=True))
        )


if __name__ == "__main__":
    main()
