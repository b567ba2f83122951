"""Certified abstention: answer only when confident enough that the error rate on answered images is
at most ``target_risk``, with probability at least ``1 - delta`` over the calibration draw.

Method: a fixed, data-independent grid of ``m`` confidence thresholds λ. For each λ the errors among
the ``n_λ`` accepted calibration images are Binomial(n_λ, R(λ)) given ``n_λ``, so the one-sided
Clopper–Pearson bound at level δ/m is a valid upper confidence bound on the selective risk R(λ); by
the union bound all m bounds hold together with probability ≥ 1-δ. The smallest λ (most answers)
whose bound is ≤ target is returned. If none qualifies the threshold is +∞ (abstain on everything)
with a warning. (Learn-then-Test with fixed-sequence testing and SGR are tighter; see the trust-layer
issue.)
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from roadwork.errors import InputError, RoadworkWarning
from roadwork.trust._checks import check_level

__all__ = ["AbstentionCertificate", "certify_abstention", "clopper_pearson_upper", "threshold_grid"]


def clopper_pearson_upper(errors: np.ndarray, n: np.ndarray, delta: float) -> np.ndarray:
    """One-sided (1-δ) Clopper–Pearson upper bound on a binomial rate; 1 where n == 0."""
    from scipy.special import betaincinv

    k = np.asarray(errors, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    out = np.ones_like(k)
    ok = (n > 0) & (k < n)
    out[ok] = betaincinv(k[ok] + 1, n[ok] - k[ok], 1 - delta)
    return out


def threshold_grid(n_classes: int, m: int = 50) -> np.ndarray:
    """Confidence thresholds from 1/K (answer everything) towards 1, dense near 1 where models live."""
    return 1.0 - (1.0 - 1.0 / n_classes) * np.geomspace(1.0, 1e-4, m)


@dataclass(frozen=True)
class AbstentionCertificate:
    """Answer when calibrated confidence >= ``threshold``; selective risk <= target w.p. >= 1-delta."""

    threshold: float
    target_risk: float
    delta: float
    n: int
    coverage: float  # share of calibration images answered at the threshold
    risk: float  # empirical selective risk on them
    risk_upper_bound: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AbstentionCertificate:
        return cls(
            threshold=float(d["threshold"]),
            target_risk=float(d["target_risk"]),
            delta=float(d["delta"]),
            n=int(d["n"]),
            coverage=float(d["coverage"]),
            risk=float(d["risk"]),
            risk_upper_bound=float(d["risk_upper_bound"]),
        )


def certify_abstention(
    confidence: object, correct: object, *, target_risk: float, delta: float, n_classes: int, m: int = 50
) -> AbstentionCertificate:
    """Certify a confidence threshold on calibration data (see the module docstring)."""
    r = check_level(target_risk, "target_risk", "certify_abstention")
    d = check_level(delta, "delta", "certify_abstention")
    c = np.asarray(confidence, dtype=np.float64).ravel()
    ok = np.asarray(correct).ravel()
    if c.shape != ok.shape:
        raise InputError(f"certify_abstention: 'confidence' has {c.size} rows but 'correct' has {ok.size}.")
    if not np.isfinite(c).all():
        raise InputError("The 'confidence' parameter of certify_abstention contains NaN or inf.")
    err = ~ok.astype(bool)
    grid = threshold_grid(n_classes, m)
    accepted = c[None, :] >= grid[:, None]  # (m, n)
    n_acc = accepted.sum(axis=1)
    k_err = (accepted & err[None, :]).sum(axis=1)
    ucb = clopper_pearson_upper(k_err, n_acc, d / m)
    good = np.flatnonzero((ucb <= r) & (n_acc > 0))
    if good.size == 0:
        warnings.warn(
            f"No confidence threshold certifies selective risk <= {r} at delta={d} with {c.size} calibration "
            "points: the policy abstains on everything. Raise selective.target_risk or add calibration data.",
            RoadworkWarning,
            stacklevel=2,
        )
        return AbstentionCertificate(math.inf, r, d, c.size, 0.0, 0.0, 1.0)
    j = good[0]  # thresholds increase along the grid: the first certified one answers the most
    return AbstentionCertificate(
        float(grid[j]),
        r,
        d,
        int(c.size),
        float(n_acc[j] / max(c.size, 1)),
        float(k_err[j] / n_acc[j]),
        float(ucb[j]),
    )
