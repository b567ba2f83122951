"""Conformal risk control (Angelopoulos, Bates, Fisch, Lei & Schuster, 2022), numpy only.

For losses ``L_i(λ) ∈ [0, B]`` that do not increase with λ, the smallest λ with
``(n R̂_n(λ) + B) / (n + 1) <= α`` gives ``E[L_{n+1}(λ̂)] <= α`` for an exchangeable new point.

The default use, :class:`FalseNegativeControl`, bounds the rate of missed positives (missed work zones):
the positive class is flagged whenever its calibrated probability is at least ``threshold_``. Fitted on the
calibration images *of the positive class* (exchangeable among themselves), the loss
``1[p_pos < t]`` gives ``E[miss rate among positives] <= α``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from roadwork.errors import InputError, NotFittedError
from roadwork.jsonio import threshold_from_json, threshold_to_json
from roadwork.trust._checks import check_labels, check_level, check_probs

__all__ = ["FalseNegativeControl", "conformal_risk_control"]


def conformal_risk_control(losses: np.ndarray, alpha: float, *, bound: float = 1.0) -> int:
    """Index of λ̂ in a grid whose columns hold ``L_i(λ_j)`` (shape (n, m), non-increasing along j).

    Returns ``m`` when even the last λ does not satisfy the bound (the caller treats that as "always act").
    """
    a = check_level(alpha, "alpha", "conformal_risk_control")
    loss = np.asarray(losses, dtype=np.float64)
    if loss.ndim != 2:
        raise InputError(f"conformal_risk_control: 'losses' must have shape (n, m); got {loss.shape}.")
    if (loss < 0).any() or (loss > bound).any():
        raise InputError(f"conformal_risk_control: losses must lie in [0, bound={bound}].")
    n = loss.shape[0]
    ok = (loss.sum(axis=0) + bound) / (n + 1) <= a
    return int(np.argmax(ok)) if ok.any() else loss.shape[1]


class FalseNegativeControl:
    """Flag the positive class when ``p_pos >= threshold_``; E[missed positives / positives] <= alpha.

    ``group_by``: per value of that slice column with at least ``min_count`` positive calibration images, its
    own threshold (the bound then holds within each such value); other rows get the global threshold."""

    def __init__(
        self, *, alpha: float = 0.05, positive: int = 1, group_by: str | None = None, min_count: int = 100
    ) -> None:
        self.alpha = alpha
        self.positive = positive
        self.group_by = group_by
        self.min_count = min_count

    @staticmethod
    def _threshold(s: np.ndarray, a: float) -> float:
        s = np.sort(s)
        n = s.size
        # CRC with L_i(t) = 1[s_i < t]: the largest t with #{s_i < t} <= (n+1)α - 1 (0/1 loss, B = 1)
        k = math.floor((n + 1) * a - 1 + 1e-12)
        if k < 0 or n == 0:
            return 0.0  # too few positives to allow any miss: flag every image
        if k >= n:
            return math.inf  # α so large that missing every positive is allowed
        return float(s[k])

    def fit(self, probs: object, labels: object, groups: object = None) -> FalseNegativeControl:
        a = check_level(self.alpha, "alpha", "FalseNegativeControl.fit")
        p = check_probs(probs, "FalseNegativeControl.fit")
        y = check_labels(labels, len(p), p.shape[1], "FalseNegativeControl.fit")
        if (
            isinstance(self.positive, bool)
            or not isinstance(self.positive, int | np.integer)
            or not 0 <= self.positive < p.shape[1]
        ):
            raise InputError(
                f"The 'positive' parameter of FalseNegativeControl.fit must be a class index in "
                f"[0, {p.shape[1] - 1}]. Got {self.positive!r} instead."
            )
        pos = y == self.positive
        self.threshold_ = self._threshold(p[pos, self.positive], a)
        self.n_ = int(pos.sum())
        self.group_thresholds_: dict[str, float] = {}
        if groups is not None:
            g = np.asarray(groups).astype(str).ravel()
            if g.size != len(p):
                raise InputError(f"FalseNegativeControl.fit: 'groups' has {g.size} rows; expected {len(p)}.")
            for value in np.unique(g[pos]):
                rows = pos & (g == value)
                if rows.sum() >= self.min_count:
                    self.group_thresholds_[str(value)] = self._threshold(p[rows, self.positive], a)
        return self

    def predict(self, probs: object, groups: object = None) -> np.ndarray:
        """Boolean flag per image: the positive class cannot be ruled out."""
        if not hasattr(self, "threshold_"):
            raise NotFittedError(self)
        p = check_probs(probs, "FalseNegativeControl.predict")
        t = np.full(len(p), self.threshold_)
        if self.group_thresholds_ and groups is not None:
            g = np.asarray(groups).astype(str)
            for value, thr in self.group_thresholds_.items():
                t[g == value] = thr
        return p[:, self.positive] >= t

    def to_dict(self) -> dict[str, Any]:
        if not hasattr(self, "threshold_"):
            raise NotFittedError(self)
        return {
            "alpha": self.alpha,
            "positive": self.positive,
            "threshold": threshold_to_json(self.threshold_),
            "flags": "none" if math.isinf(self.threshold_) else "some",
            "n": self.n_,
            "group_by": self.group_by,
            "min_count": self.min_count,
            "group_thresholds": {k: threshold_to_json(v) for k, v in self.group_thresholds_.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FalseNegativeControl:
        obj = cls(
            alpha=float(d["alpha"]),
            positive=int(d["positive"]),
            group_by=d.get("group_by"),
            min_count=int(d.get("min_count", 100)),
        )
        obj.threshold_, obj.n_ = threshold_from_json(d["threshold"]), int(d["n"])
        obj.group_thresholds_ = {
            str(k): threshold_from_json(v) for k, v in (d.get("group_thresholds") or {}).items()
        }
        return obj
