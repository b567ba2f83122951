"""Cascade cost vs the largest stage alone, measured side by side in one run on the same decoded test images.

    python benchmarks/cascade_cost.py [runs/demo] [--batch 32] [--repeats 5]

Reads a finished run with a cascade (``roadwork demo`` builds one) and decodes its test split once (decoding
is the same for every row, so it is left out). In batches of ``--batch``, as the server would, it times every
stage alone and every candidate cascade the cascade stage certified (each subset of earlier stages with its
own certified gate; the one the bundle ships is marked) — a cascade sends only the images an earlier stage
did not answer on to the next one. Every configuration runs on each batch in turn (this machine is shared and
noisy: bursts then hit all rows alike), ``--repeats`` passes, and each row keeps its median. Accuracy is on the whole test split. The shipped cascade is run through the bundle
itself, and the last line checks it answers as the in-process evaluation (``metrics.json``) did.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from roadwork.data.preprocess import load_rgb
from roadwork.export.bundle import Bundle
from roadwork.export.cascade import StageRunner
from roadwork.models.factory import ModelCard
from roadwork.trust import TrustPolicy
from roadwork.trust.cascade import Cascade, CascadeStage


def _runner(cascade_dir: Path, st: CascadeStage) -> StageRunner:
    if st.kind == "boosting":
        return StageRunner.boosting(cascade_dir / st.file)
    card = ModelCard.load(cascade_dir / st.info["card"])
    return StageRunner.network(cascade_dir / st.file, card.preprocess, spin=False)  # sessions share the cores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", nargs="?", default="runs/demo")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    run = Path(args.run)
    bundle = Bundle.load(run / "export" / "bundle")
    spec = json.loads((run / "cascade" / "cascade.json").read_text())
    if not spec.get("enabled"):
        raise SystemExit(f"{run} has no cascade; run it with cascade.enabled=true (the demo preset does).")
    shipped = Cascade.from_dict(spec)
    every = {d["name"]: CascadeStage.from_dict(d) for d in spec.get("all_stages") or spec["stages"]}
    model_name = shipped.names[-1]
    runners = {name: _runner(run / "cascade_models", st) for name, st in every.items() if name != model_name}
    df = pd.read_parquet(run / "data" / "dataset.parquet")
    test = df[df["split"] == "test"]
    classes = bundle.classes
    y = test["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    images = [load_rgb(p if Path(p).is_absolute() else str(run / "data" / p)) for p in test["path"]]
    n, b, k = len(images), args.batch, len(classes)
    batches = [images[i : i + b] for i in range(0, n, b)]

    def alone(name: str) -> Callable[[list[Any]], tuple[np.ndarray, np.ndarray]]:
        if name == model_name:
            return lambda ims: (
                bundle.policy.apply(bundle.logits(ims, batch_size=b)).pred,
                np.zeros(len(ims), int),
            )
        st, r = every[name], runners[name]
        return lambda ims: (
            st.calibrator.predict_proba(r.logits(ims, batch_size=b)[:, :k]).argmax(1),  # type: ignore[union-attr]
            np.zeros(len(ims), int),
        )

    def cascade_fn(c: Cascade) -> Callable[[list[Any]], tuple[np.ndarray, np.ndarray]]:
        policy = TrustPolicy.from_dict({**bundle.policy.to_dict(), "cascade": c.to_dict()})
        rs = [runners[st.name] for st in c.stages[:-1]]

        def fn(ims: list[Any]) -> tuple[np.ndarray, np.ndarray]:
            def stage_logits(s: int, rows: np.ndarray) -> np.ndarray:
                sub = [ims[i] for i in rows]
                return rs[s].logits(sub, batch_size=b) if s < len(rs) else bundle.logits(sub, batch_size=b)

            out = policy.apply_cascade(stage_logits, len(ims))
            return out.pred, out.stage  # type: ignore[return-value]

        return fn

    rows: dict[str, tuple[Callable[[list[Any]], tuple[np.ndarray, np.ndarray]], list[str]]] = {
        f"{name} alone": (alone(name), [name]) for name in every
    }
    candidates = spec.get("candidates") or [
        {"stages": shipped.names, "threshold": shipped.threshold, "chosen": True}
    ]
    for cand in candidates:
        if len(cand["stages"]) < 2:
            continue
        c = Cascade.from_dict(
            {**spec, "stages": [every[s].to_dict() for s in cand["stages"]], "threshold": cand["threshold"]}
        )
        label = " → ".join(cand["stages"]) + (" (shipped)" if cand.get("chosen") else "")
        if cand.get("chosen"):  # the bundle itself runs the shipped cascade
            rows[label] = (
                lambda ims: (lambda o: (o.pred, o.stage))(bundle.predict_images(ims)),
                cand["stages"],
            )  # type: ignore[misc]
        else:
            rows[label] = (cascade_fn(c), cand["stages"])
    times: dict[str, list[float]] = {name: [] for name in rows}
    preds: dict[str, np.ndarray] = {}
    stage_of: dict[str, np.ndarray] = {}
    for fn, _ in rows.values():  # warm-up
        fn(batches[0])
    for _ in range(args.repeats):
        # interleave at the finest grain — every configuration on the same batch, one after the other — so the
        # bursts of a shared machine fall on all of them alike (alternating whole passes left 0.8–1.4 ms swings)
        spent = dict.fromkeys(rows, 0.0)
        outs: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {name: [] for name in rows}
        for chunk in batches:
            for name, (fn, _) in rows.items():
                t0 = time.perf_counter()
                outs[name].append(fn(chunk))
                spent[name] += time.perf_counter() - t0
        for name in rows:
            times[name].append(spent[name] * 1000 / n)
            preds[name] = np.concatenate([o[0] for o in outs[name]])
            stage_of[name] = np.concatenate([o[1] for o in outs[name]])
    ms = {name: float(np.median(v)) for name, v in times.items()}
    base = f"{model_name} alone"
    t = Table(
        title=f"cascade vs its largest stage ({n} test images, batch {b}, median of {args.repeats} passes)"
    )
    for col in (
        "configuration",
        "stage mix",
        "accuracy",
        "Δ acc (points)",
        "ms/img",
        "img/s",
        "cost vs largest",
    ):
        t.add_column(col, justify="left" if col in ("configuration", "stage mix") else "right")
    acc_base = float((preds[base] == y).mean())
    for name, (_, names) in rows.items():
        share = np.bincount(stage_of[name], minlength=len(names)) / n
        acc = float((preds[name] == y).mean())
        t.add_row(
            name,
            " / ".join(f"{s} {x:.1%}" for s, x in zip(names, share, strict=True)),
            f"{acc:.4f}",
            f"{100 * (acc - acc_base):+.2f}",
            f"{ms[name]:.4f}",
            f"{1000 / ms[name]:.0f}",
            f"{ms[name] / ms[base]:.1%}",
        )
    console = Console(width=150)
    console.print(t)
    metrics = json.loads((run / "evaluate" / "metrics.json").read_text()).get("cascade")
    shipped_row = next((r for r in rows if r.endswith("(shipped)")), None)
    if metrics and shipped_row:
        same = abs(metrics["accuracy"] - float((preds[shipped_row] == y).mean())) < 1e-12
        console.print(
            f"in-process evaluation (metrics.json): accuracy {metrics['accuracy']:.4f}, stage share "
            + ", ".join(f"{k} {v:.1%}" for k, v in metrics["stage_share"].items())
            + f"; the bundle agrees: {same}"
        )


if __name__ == "__main__":
    main()
