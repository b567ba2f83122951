"""Real photos: today's default recipe vs train.augment=standard vs strong, from scratch, the same epoch budget.

    python benchmarks/real_photos.py [--epochs 6] [--image-size 96] [--target-risk 0.1] [--threads 2]

Reads ``../shared/data/real-roadwork-mini`` (1,079 photos, 256x256; see its SOURCES.md) in place — nothing is
copied into the project — and exits cleanly when it is absent. Each row is one whole pipeline run
(``run_pipeline``: data → train → calibrate → conformal / selective → policy → export → evaluate; cascade off,
tracking off) of ``configs/default.yaml`` — ``resnet10t``, random weights, ``train.augment=light`` —
with only ``train.augment`` changed, the same seed, epochs (early stopping off) and image size, on ``--threads``
torch threads. The figures are those of the exported bundle on the test split (``evaluate/metrics.json``):
accuracy, AUROC, ECE before → after temperature scaling, split-conformal coverage at α = 0.1, and the share of
test images answered by the certified abstention rule at ``selective.target_risk`` (δ = 0.05).

This set separates partly by collection style: its two classes come from different photo collections (TraCon
cone photos vs ordinary-road photos), so a model can tell them apart by style as much as by work-zone content.
Read its accuracy as a smoke test on real JPEGs, not as a measure of roadwork detection.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
REAL = HERE.parents[1] / "shared" / "data" / "real-roadwork-mini"
STYLE = (
    "Caveat: this set separates partly by collection style (the two classes come from different photo "
    "collections), so accuracy here is a smoke test on real JPEGs, not a measure of roadwork detection."
)


def _run(root: Path, augment: str, args: argparse.Namespace) -> dict[str, float]:
    from roadwork.config import load_config
    from roadwork.errors import RoadworkWarning
    from roadwork.pipeline import run_pipeline

    cfg = load_config(
        "default",
        [
            f"name=real-{augment}",
            f"root={root}",
            f"data.source={REAL / 'manifest.csv'}",
            "model.pretrained=false",
            f"model.image_size={args.image_size}",
            f"train.augment={augment}",
            f"train.epochs={args.epochs}",
            f"train.patience={args.epochs}",  # the same epoch budget for every row
            f"train.threads={args.threads}",
            f"selective.target_risk={args.target_risk}",
            "cascade.enabled=false",
            "tracking.enabled=false",
            "export.parity_samples=16",
        ],
    )
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RoadworkWarning)
        result = run_pipeline(cfg, progress=False)
    m = result.metrics or {}
    t, c, s = m["test"], m["conformal"], m["selective"]
    return {
        "n": t["n"],
        "accuracy": t["accuracy"],
        "auroc": t["auroc"],
        "ece_before": t["ece"]["uncalibrated"],
        "ece_after": t["ece"]["calibrated"],
        "coverage": c["coverage"],
        "answered": s["coverage"],
        "seconds": time.perf_counter() - t0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--target-risk", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--augments", default="light,standard,strong")
    args = ap.parse_args()
    if not (REAL / "manifest.csv").is_file():
        print(f"skipped: {REAL} is absent (see its SOURCES.md for what it holds)")
        return
    sys.path.insert(0, str(HERE))
    from _machine import machine_lines

    for line in machine_lines():
        print(line)
    print(
        f"data: {REAL} (1,079 photos at 256x256, read in place); configs/default.yaml from scratch "
        f"(resnet10t, random weights) at {args.image_size} px, {args.epochs} epochs (no early stop), "
        f"{args.threads} torch threads; conformal α = 0.1; abstention target risk {args.target_risk:g}, δ = 0.05"
    )
    print(STYLE + "\n")
    rows = []
    with tempfile.TemporaryDirectory(prefix="roadwork-real-") as d:
        for augment in args.augments.split(","):
            r = _run(Path(d), augment, args)
            rows.append((augment, r))
            print(f"  {augment}: done in {r['seconds']:.0f} s", file=sys.stderr, flush=True)
    print(
        "| train.augment | test n | accuracy | AUROC | ECE before → after | coverage (1-α = 0.9) | answered | s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for augment, r in rows:
        label = f"{augment} (today's default)" if augment == "light" else augment
        print(
            f"| {label} | {r['n']} | {r['accuracy']:.3f} | {r['auroc']:.3f} | {r['ece_before']:.3f} → "
            f"{r['ece_after']:.3f} | {r['coverage']:.3f} | {r['answered']:.3f} | {r['seconds']:.0f} |"
        )
    print("\n" + STYLE)


if __name__ == "__main__":
    main()
