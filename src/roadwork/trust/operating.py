"""Operating point for binary consumers that threshold a score at 0.5 (StreetVision validators do).

A threshold ``t`` on the calibrated positive-class probability is chosen on the calibration split — the
one with the best MCC, or the lowest one whose precision reaches a target, or the highest one whose recall
reaches a target — and the score is remapped monotonically, piecewise linearly, so that ``t`` lands at
exactly 0.5: ``s = p / (2t)`` below ``t`` and ``s = 0.5 + (p - t) / (2(1 - t))`` above.

**One decision.** With an operating point, the decision a client acts on is the operating point's: ``label`` is
the positive class exactly where ``p ≥ t`` (where ``score ≥ 0.5``), see :func:`decide`, and the certified
abstention is fitted for that decision, on the probability of the class it decides. So ``label``, ``score ≥ 0.5``
and ``abstain`` agree, and the selective risk printed and certified is the error of that ``label``. (Before, the
score moved and ``label`` stayed the argmax: the two disagreed on up to 17 % of answered images, and the score's
decision carried no guarantee.) Prediction sets are unchanged: they are about the class, not the decision.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from roadwork.errors import InputError

__all__ = ["OperatingPoint", "decide", "fit_operating_point"]

Criterion = Literal["max_mcc", "precision", "recall"]


@dataclass(frozen=True)
class OperatingPoint:
    """A decision threshold on the calibrated positive-class probability of a binary task, with the precision,
    recall and MCC it had on the calibration split. :meth:`remap` moves the threshold to 0.5 (piecewise linear,
    monotone), so a consumer that thresholds at 0.5 (StreetVision) decides at the chosen point."""

    criterion: str
    target: float | None
    threshold: float  # on the calibrated positive-class probability
    calib_precision: float
    calib_recall: float
    calib_mcc: float

    def remap(self, p_pos: np.ndarray) -> np.ndarray:
        t = min(max(self.threshold, 1e-9), 1 - 1e-9)
        p = np.asarray(p_pos, dtype=np.float64)
        return np.where(p < t, p / (2 * t), 0.5 + (p - t) / (2 * (1 - t)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OperatingPoint:
        return cls(
            criterion=str(d["criterion"]),
            target=None if d.get("target") is None else float(d["target"]),
            threshold=float(d["threshold"]),
            calib_precision=float(d["calib_precision"]),
            calib_recall=float(d["calib_recall"]),
            calib_mcc=float(d["calib_mcc"]),
        )


def decide(probs: np.ndarray, positive: int, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """The operating-point decision on calibrated binary probabilities (shape (n, 2)): ``(pred, confidence)``,
    ``pred`` the positive class where its probability ≥ ``threshold`` (the other class elsewhere) and
    ``confidence`` the calibrated probability of the decided class (what abstention thresholds)."""
    p = np.asarray(probs, dtype=np.float64)[:, positive]
    is_pos = p >= threshold
    pred = np.where(is_pos, positive, 1 - positive).astype(np.intp)
    return pred, np.where(is_pos, p, 1.0 - p)


def _sweep(p: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, ...]:
    """Predict positive when p >= t, for every distinct t: thresholds, precision, recall, MCC (vectorised)."""
    order = np.argsort(-p, kind="stable")
    ps, ys = p[order], y[order].astype(np.float64)
    last = np.r_[np.flatnonzero(np.diff(ps) != 0), len(ps) - 1]  # end of each run of equal p
    tp = np.cumsum(ys)[last]
    fp = (last + 1) - tp
    pos, neg = ys.sum(), len(ys) - ys.sum()
    fn, tn = pos - tp, neg - fp
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = tp / (tp + fp)
        recall = tp / pos if pos else np.zeros_like(tp)
        mcc = (tp * tn - fp * fn) / np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return ps[last], precision, recall, np.nan_to_num(mcc)


def fit_operating_point(
    p_pos: object, is_positive: object, *, criterion: Criterion = "max_mcc", target: float | None = None
) -> OperatingPoint:
    """The threshold that maximises MCC (``criterion="max_mcc"``), or the one with the most recall at precision
    ≥ ``target`` (``"precision"``), or the most precision at recall ≥ ``target`` (``"recall"``), over every
    distinct probability in ``p_pos`` (shape (n,)) against the boolean ``is_positive``."""
    p = np.asarray(p_pos, dtype=np.float64).ravel()
    y = np.asarray(is_positive).astype(bool).ravel()
    if p.shape != y.shape or p.size == 0:
        raise InputError(
            "fit_operating_point needs one positive-class probability per label, and at least one."
        )
    thr, prec, rec, mcc = _sweep(p, y)
    if criterion == "max_mcc":
        j = int(np.argmax(mcc))
        target = None  # not used by this criterion; do not record one
    elif criterion in ("precision", "recall"):
        if target is None or not 0 < target < 1:
            raise InputError(
                f"The 'target' of operating point '{criterion}' must be a float in (0, 1). "
                f"Got {target!r} instead."
            )
        ok = np.flatnonzero((prec if criterion == "precision" else rec) >= target)
        if ok.size == 0:
            raise InputError(
                f"No threshold reaches {criterion} >= {target} on the calibration split; lower policy.target."
            )
        # thresholds decrease along the sweep: precision → the lowest one that still qualifies (most recall);
        # recall → the highest one that qualifies (most precision)
        j = int(ok[-1]) if criterion == "precision" else int(ok[0])
    else:
        raise InputError(
            f"Unknown operating point criterion {criterion!r}; use max_mcc, precision or recall."
        )
    return OperatingPoint(
        criterion, target, float(thr[j]), float(np.nan_to_num(prec[j])), float(rec[j]), float(mcc[j])
    )
