"""What the deployed policy delivers in the field, estimated from the audit sample only.

The audit sample is a uniform random share of predictions (``audit_rate``), chosen when each was served and
before any label exists, so its labelled rows are a simple random sample of the traffic: a binomial count with
an exact (Clopper–Pearson) interval is valid for each rate. Labels on other predictions come back for reasons
that depend on the prediction (reviewers look at abstained images, at alarms, at complaints): their rates are
biased, and are never used here (they serve learning and recertification).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from roadwork.field.store import StoredPrediction
from roadwork.trust.selective import clopper_pearson_upper

__all__ = ["FIELD_RATES", "clopper_pearson", "field_estimates"]

FIELD_RATES = ("coverage", "accuracy", "selective_risk", "miss_rate")
"""The rates estimated: the set contains the true class; the decision is right; the decision is wrong when
answered (abstain=false); a true positive not decided positive (binary tasks with a positive class)."""


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float | None, float | None]:
    """The exact two-sided ``level`` interval of a binomial rate from ``k`` of ``n`` (``None`` when n = 0)."""
    from scipy.stats import beta

    if n <= 0:
        return None, None
    a = (1 - level) / 2
    low = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    high = float(
        clopper_pearson_upper(np.array([k]), np.array([n]), a)[0]
    )  # the trust layer's one-sided bound
    return low, high


def _rate(hits: np.ndarray, level: float) -> dict[str, Any]:
    n, k = int(hits.size), int(hits.sum())
    low, high = clopper_pearson(k, n, level)
    return {"n": n, "rate": k / n if n else None, "low": low, "high": high}


def field_estimates(
    rows: Sequence[tuple[StoredPrediction, int]],
    classes: Sequence[str],
    *,
    positive_class: str | None = None,
    slice_columns: Sequence[str] = (),
    level: float = 0.95,
) -> dict[str, Any]:
    """Field rates with exact intervals, overall and per value of each slice column, from labelled audit rows
    (``(prediction, true class index)``; pass only ``audit`` rows: see the module docstring)."""

    def rates(sub: Sequence[tuple[StoredPrediction, int]]) -> dict[str, Any]:
        truth = [classes[y] for _, y in sub]
        covered = np.array([t in p.pred_set for (p, _), t in zip(sub, truth, strict=True)], dtype=bool)
        right = np.array([p.label == t for (p, _), t in zip(sub, truth, strict=True)], dtype=bool)
        answered = np.array([not p.abstain for p, _ in sub], dtype=bool)
        out = {
            "coverage": _rate(covered, level),
            "accuracy": _rate(right, level),
            "selective_risk": _rate(~right[answered], level),
        }
        if positive_class is not None:
            pos = np.array([t == positive_class for t in truth], dtype=bool)
            missed = np.array([p.label != positive_class for p, _ in sub], dtype=bool)
            out["miss_rate"] = _rate(missed[pos], level)
        return out

    result: dict[str, Any] = {"n": len(rows), "level": level, "overall": rates(rows), "slices": {}}
    for col in slice_columns:
        values = sorted({p.meta.get(col, "") for p, _ in rows})
        for v in values:
            sub = [r for r in rows if r[0].meta.get(col, "") == v]
            result["slices"][f"{col}={v}"] = rates(sub)
    return result
