"""Certified abstention: answer only when confident enough that the error rate on answered images (the
selective risk) is at most ``target_risk``, with probability at least ``1 - delta`` over the calibration draw.

Given ``n_λ`` calibration images accepted at threshold λ, their errors are Binomial(n_λ, R(λ)), so a
binomial tail bound on them is valid conditionally on ``n_λ``. Three ways to search the thresholds:

- ``bonferroni``: a fixed, data-independent grid of ``m`` thresholds; Clopper–Pearson bound at δ/m for each;
  the union bound makes all hold together. Simple, valid, conservative.
- ``ltt`` (Learn-then-Test, Angelopoulos et al., 2021): Hoeffding–Bentkus p-values and fixed-sequence
  testing from the strictest threshold down, stopping at the first p-value above δ; no multiplicity
  correction. A fixed sequence needs an order chosen before the data it tests: ``order_fraction`` of the
  calibration rows (default 20 %) sets the grid (quantiles of their confidences, from the strictest one
  that could pass with zero errors down to answering everything), the rest is tested.
- ``sgr`` (Geifman & El-Yaniv, 2017, Algorithm 1): binary search over the sorted calibration confidences,
  ⌈log2 n⌉ Clopper–Pearson bounds at δ/⌈log2 n⌉. As in the paper, the union bound treats the searched
  thresholds as fixed; the result is the least strict tested threshold whose bound is ≤ target.

If no threshold qualifies the threshold is +∞ (abstain on everything) with a warning.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from roadwork.errors import InputError, RoadworkWarning
from roadwork.trust._checks import check_level

__all__ = [
    "AbstentionCertificate",
    "certify_abstention",
    "clopper_pearson_upper",
    "hoeffding_bentkus_pvalue",
    "threshold_grid",
]

Method = Literal["bonferroni", "ltt", "sgr"]


def clopper_pearson_upper(errors: np.ndarray, n: np.ndarray, delta: float) -> np.ndarray:
    """One-sided (1-δ) Clopper–Pearson upper bound on a binomial rate; 1 where n == 0."""
    from scipy.special import betaincinv

    k = np.asarray(errors, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    out = np.ones_like(k)
    ok = (n > 0) & (k < n)
    out[ok] = betaincinv(k[ok] + 1, n[ok] - k[ok], 1 - delta)
    return out


def hoeffding_bentkus_pvalue(risk_hat: np.ndarray, n: np.ndarray, target: float) -> np.ndarray:
    """p-value of H0: risk > target from an empirical risk of n losses in [0, 1] (Bates et al., 2021).

    ``min(exp(-n h(min(R̂, t), t)), e · P(Binomial(n, t) <= ⌈n R̂⌉))`` with ``h`` the binary KL divergence;
    1 where n == 0.
    """
    from scipy.stats import binom

    r = np.asarray(risk_hat, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    a = np.clip(np.minimum(r, target), 1e-12, 1 - 1e-12)
    kl = a * np.log(a / target) + (1 - a) * np.log((1 - a) / (1 - target))
    hoeffding = np.exp(-n * kl)
    bentkus = math.e * binom.cdf(np.ceil(n * r - 1e-9), n, target)
    return np.where(n > 0, np.minimum(np.minimum(hoeffding, bentkus), 1.0), 1.0)


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
    method: str = "bonferroni"

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
            method=str(d.get("method", "bonferroni")),
        )


def _counts(c: np.ndarray, err: np.ndarray, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Accepted and wrong counts at each threshold, via one sort: O((n + m) log n)."""
    order = np.argsort(c, kind="stable")
    c_sorted = c[order]
    err_from_top = np.concatenate([np.cumsum(err[order][::-1])[::-1], [0]])  # errors among c_sorted[i:]
    start = np.searchsorted(c_sorted, grid, side="left")  # first index with c >= threshold
    return len(c) - start, err_from_top[start]


def certify_abstention(
    confidence: object,
    correct: object,
    *,
    target_risk: float,
    delta: float,
    n_classes: int,
    method: Method = "bonferroni",
    m: int = 50,
    order_fraction: float = 0.2,
    seed: int = 0,
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
    if method not in ("bonferroni", "ltt", "sgr"):
        raise InputError(
            f"The 'method' parameter of certify_abstention must be 'bonferroni', 'ltt' or 'sgr'. "
            f"Got {method!r} instead."
        )
    err = ~ok.astype(bool)
    n_total = c.size

    if method == "bonferroni":
        grid = threshold_grid(n_classes, m)
        n_acc, k_err = _counts(c, err, grid)
        ucb = clopper_pearson_upper(k_err, n_acc, d / m)
        good = np.flatnonzero((ucb <= r) & (n_acc > 0))
        j = int(good[0]) if good.size else -1  # thresholds increase along the grid: the first answers most
    elif method == "ltt":
        idx = np.random.default_rng([seed, 11]).permutation(n_total)
        n_order = round(order_fraction * n_total)
        c_order, test = c[idx[:n_order]], idx[n_order:]
        c, err = c[test], err[test]
        # Strictest first. The sequence starts where it can succeed: with zero errors, rejecting needs at least
        # n_min = log δ / log(1 - r) answered rows, so the first threshold answers ~1.5 n_min of them.
        n_min = math.log(d) / math.log(1 - r)
        start = min(1.0, 1.5 * n_min / max(len(test), 1))
        levels = np.linspace(start, 1.0, m)  # shares of rows answered, as estimated on the ordering rows
        grid = np.unique(np.quantile(c_order, 1 - levels))[::-1] if n_order else np.array([])
        n_acc, k_err = _counts(c, err, grid)
        pvals = hoeffding_bentkus_pvalue(k_err / np.maximum(n_acc, 1), n_acc, r)
        failed = np.flatnonzero(pvals > d)
        last = (int(failed[0]) if failed.size else len(grid)) - 1  # fixed sequence: stop at the first failure
        j = last if last >= 0 and n_acc[last] > 0 else -1
        ucb = clopper_pearson_upper(k_err, n_acc, d)  # reported alongside; the test is the HB p-value
    else:  # sgr
        c_sorted = np.sort(c)
        k = max(1, math.ceil(math.log2(max(n_total, 2))))
        z_min, z_max = 0, n_total - 1
        tested: list[float] = []
        for _ in range(k):
            z = math.ceil((z_min + z_max) / 2)
            theta = c_sorted[z]
            n_a, k_e = _counts(c, err, np.array([theta]))
            b = float(clopper_pearson_upper(k_e, n_a, d / k)[0])
            tested.append(theta)
            if b < r:
                z_max = z
            else:
                z_min = z
        grid = np.unique(np.array(tested))
        n_acc, k_err = _counts(c, err, grid)
        ucb = clopper_pearson_upper(k_err, n_acc, d / k)
        good = np.flatnonzero((ucb < r) & (n_acc > 0))
        j = int(good[0]) if good.size else -1

    if j < 0:
        warnings.warn(
            f"No confidence threshold certifies selective risk <= {r} at delta={d} with {n_total} calibration "
            "points: the policy abstains on everything. Raise selective.target_risk or add calibration data.",
            RoadworkWarning,
            stacklevel=2,
        )
        return AbstentionCertificate(math.inf, r, d, n_total, 0.0, 0.0, 1.0, method)
    return AbstentionCertificate(
        float(grid[j]),
        r,
        d,
        n_total,
        float(n_acc[j] / max(c.size, 1)),
        float(k_err[j] / n_acc[j]),
        float(ucb[j]),
        method,
    )
