"""Split-conformal prediction sets (numpy only).

LAC (least ambiguous set-valued classifier, Sadinle et al. 2019): score ``s = 1 - p_y``; with ``n``
calibration scores the threshold is the ⌈(n+1)(1-α)⌉-th smallest score, and the set of a new image is
``{k : 1 - p_k <= q}``. If calibration and test images are exchangeable,
``P(y ∈ set) >= 1 - α`` (and ``<= 1 - α + 1/(n+1)`` without ties). When ⌈(n+1)(1-α)⌉ > n the
threshold is +∞ (every set is the full label set) and a warning says how many points are needed.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from roadwork.errors import NotFittedError, RoadworkWarning
from roadwork.trust._checks import check_labels, check_level, check_probs

__all__ = ["LACConformal", "conformal_quantile"]


def conformal_quantile(scores: np.ndarray, alpha: float) -> float:
    """The ⌈(n+1)(1-α)⌉-th smallest of ``scores`` (+∞ with a warning when that exceeds n)."""
    alpha = check_level(alpha, "alpha", "conformal_quantile")
    s = np.asarray(scores, dtype=np.float64).ravel()
    n = s.size
    k = math.ceil(
        (n + 1) * (1 - alpha) - 1e-12
    )  # the epsilon guards (n+1)(1-α) landing a hair above an integer
    if k > n:
        need = math.ceil(1 / alpha - 1)
        warnings.warn(
            f"{n} calibration points are too few for alpha={alpha}: at least {need} are needed for a finite "
            "threshold, so every prediction set is the full label set.",
            RoadworkWarning,
            stacklevel=2,
        )
        return math.inf
    return float(np.partition(s, k - 1)[k - 1])


class LACConformal:
    """Split-conformal LAC sets from calibrated probabilities. Learned state: ``threshold_``, ``n_``."""

    method = "lac"

    def __init__(self, *, alpha: float = 0.1) -> None:
        self.alpha = alpha

    def fit(self, probs: object, labels: object) -> LACConformal:
        alpha = check_level(self.alpha, "alpha", "LACConformal.fit")
        p = check_probs(probs, "LACConformal.fit")
        y = check_labels(labels, len(p), p.shape[1], "LACConformal.fit")
        scores = 1.0 - p[np.arange(len(p)), y]
        self.threshold_ = conformal_quantile(scores, alpha)
        self.n_ = len(p)
        return self

    def predict_sets(self, probs: object) -> np.ndarray:
        """Boolean membership of shape (n_samples, n_classes)."""
        if not hasattr(self, "threshold_"):
            raise NotFittedError(self)
        p = check_probs(probs, "LACConformal.predict_sets")
        return (1.0 - p) <= self.threshold_

    def to_dict(self) -> dict[str, Any]:
        if not hasattr(self, "threshold_"):
            raise NotFittedError(self)
        return {"method": self.method, "alpha": self.alpha, "threshold": self.threshold_, "n": self.n_}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LACConformal:
        obj = cls(alpha=float(d["alpha"]))
        obj.threshold_ = float(d["threshold"])  # json stores +inf as Infinity, which float() reads back
        obj.n_ = int(d["n"])
        return obj
