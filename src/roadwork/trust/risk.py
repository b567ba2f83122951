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
    """Flag the positive class when ``p_pos >= threshold_``; E[missed positives / positives] <= alpha."""

    def __init__(self, *, alpha: float = 0.05, positive: int = 1) -> None:
        self.alpha = alpha
        self.positive = positive

    def fit(self, probs: object, labels: object) -> FalseNegativeControl:
        a = check_level(self.alpha, "alpha", "FalseNegativeControl.fit")
        p = check_probs(probs, "FalseNegativeControl.fit")
        y = check_labels(labels, len(p), p.shape[1], "FalseNegativeControl.fit")
        if not 0 <= self.positive < p.shape[1]:
            raise InputError(
                f"The 'positive' parameter of FalseNegativeControl.fit must be a class index in "
                f"[0, {p.shape[1] - 1}]. Got {self.positive!r} instead."
            )
        s = np.sort(p[y == self.positive, self.positive])
        n = s.size
        # CRC with L_i(t) = 1[s_i < t]: the largest t with #{s_i < t} <= (n+1)α - 1 (0/1 loss, B = 1)
        k = math.floor((n + 1) * a - 1 + 1e-12)
        if k < 0 or n == 0:
            self.threshold_ = 0.0  # too few positives to allow any miss: flag every image
        elif k >= n:
            self.threshold_ = math.inf  # α so large that missing every positive is allowed
        else:
            self.threshold_ = float(s[k])
        self.n_ = n
        return self

    def predict(self, probs: object) -> np.ndarray:
        """Boolean flag per image: the positive class cannot be ruled out."""
        if not hasattr(self, "threshold_"):
            raise NotFittedError(self)
        p = check_probs(probs, "FalseNegativeControl.predict")
        return p[:, self.positive] >= self.threshold_

    def to_dict(self) -> dict[str, Any]:
        if not hasattr(self, "threshold_"):
            raise NotFittedError(self)
        return {"alpha": self.alpha, "positive": self.positive, "threshold": self.threshold_, "n": self.n_}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FalseNegativeControl:
        obj = cls(alpha=float(d["alpha"]), positive=int(d["positive"]))
        obj.threshold_, obj.n_ = float(d["threshold"]), int(d["n"])
        return obj
