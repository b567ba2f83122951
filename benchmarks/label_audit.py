"""The label audit on a real run: flip a known share of the calibration and test labels, estimate it back, and
calibrate the conformal sets with and without the suggested ``label_flip_rate``.

    python benchmarks/label_audit.py [--run runs/demo] [--draws 20] [--resplits 200]

The run's out-of-sample logits (calibration and test splits, what ``roadwork audit`` reads) are kept; the labels
of both splits are flipped (each to another class, uniformly, at 5 % and 10 %) and the run's calibrator is refitted
on the noisy calibration labels, as the calibrate stage would have been on such a set. Per rate: the estimated flip
rate over ``--draws`` draws (mean, worst error, share within 2 points), and the coverage of the *clean* labels by
sets calibrated on the noisy labels, plain and with the audit's suggested ``conformal.label_flip_rate`` (through the
pipeline's own conversion), over ``--resplits`` random halves (the first draw's labels).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _machine import machine_lines

from roadwork.config import ConformalConfig
from roadwork.field.audit import label_audit
from roadwork.pipeline.artifacts import load_calibrator, load_predictions
from roadwork.pipeline.certify import flip_to_noise
from roadwork.trust.conformal import SplitConformal


def _flip(y: np.ndarray, k: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    flipped = rng.random(len(y)) < rate
    other = (y + rng.integers(1, k, len(y))) % k  # one of the other classes, uniformly
    return np.where(flipped, other, y)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--draws", type=int, default=20)
    ap.add_argument("--resplits", type=int, default=200)
    ap.add_argument("--alpha", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    run = Path(args.run)
    parts = [load_predictions(run / "predict", split) for split in ("calib", "test")]
    calibrator = load_calibrator(run / "calibrate")
    if getattr(calibrator, "column", None):
        sys.exit("this benchmark refits a global calibrator; the run has a per-slice one")
    logits = np.concatenate([pr.logits for pr in parts])
    y = np.concatenate([pr.labels for pr in parts])
    n_cal = len(parts[0].labels)
    ids = [str(i) for pr in parts for i in pr.ids]
    classes = list(parts[0].classes)
    k = len(classes)
    rng = np.random.default_rng(args.seed)
    print("\n".join(machine_lines()))

    def audited(labels: np.ndarray) -> tuple[np.ndarray, dict]:  # type: ignore[type-arg]
        cal = type(calibrator)().fit(logits[:n_cal], labels[:n_cal])  # the calibrate stage, on these labels
        probs = cal.predict_proba(logits)
        return probs, label_audit(probs, labels, classes, ids)

    probs, audit0 = audited(y)
    base = audit0["flip_rate"]
    acc = float((probs.argmax(1) == y).mean())
    print(
        f"\n{len(y)} calibration + test labels of {args.run} (model accuracy {acc:.3f}); flip rate estimated on the "
        f"labels as given (the generator's own, unflipped): {base:.4f}\n"
    )
    print(
        "| flipped | estimated (mean) | worst error | draws within 2 points | coverage of clean labels: plain | "
        "with the suggested label_flip_rate | target |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for rate in (0.05, 0.10):
        est = []
        plain, fixed = [], []
        for d in range(args.draws):
            noisy = _flip(y, k, rate, rng)
            probs, audit = audited(noisy)
            est.append(audit["flip_rate"])
            if d:  # coverage: on the first draw's labels only (the re-splits carry the variance)
                continue
            f = audit["suggested_label_flip_rate"] or 0.0
            eps = flip_to_noise(ConformalConfig(label_flip_rate=f), k) if f else 0.0
            for _ in range(args.resplits):
                idx = rng.permutation(len(y))
                cal, test = idx[: len(y) // 2], idx[len(y) // 2 :]
                for out, noise in ((plain, 0.0), (fixed, eps)):
                    conf = SplitConformal(alpha=args.alpha, label_noise=noise).fit(probs[cal], noisy[cal])
                    sets = conf.predict_sets(probs[test])
                    out.append(sets[np.arange(len(test)), y[test]].mean())
        err = np.abs(np.array(est) - rate)
        print(
            f"| {rate:.2f} | {np.mean(est):.4f} | {err.max():.4f} | {np.mean(err <= 0.02):.2f} | "
            f"{np.mean(plain):.4f} | {np.mean(fixed):.4f} | {1 - args.alpha:.2f} |"
        )


if __name__ == "__main__":
    main()
