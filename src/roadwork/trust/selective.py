"""Certified abstention: answer only when confident enough that the error rate on answered images (the
selective risk) is at most ``target_risk``, with probability at least ``1 - delta`` over the calibration draw.

Given ``n_λ`` calibration images accepted at threshold λ, their errors are Binomial(n_λ, R(λ)), so a
binomial tail bound on them is valid conditionally on ``n_λ``. Three ways to search the thresholds:

- ``bonferroni``: a fixed, data-independent grid of ``m`` thresholds; Clopper–Pearson bound at δ/m for each;
  the union bound makes all hold together. Simple, valid, conservative.
- ``ltt`` (Learn-then-Test, Angelopoulos et al., 2021; the default): exact binomial p-values (errors are 0/1
  losses, Binomial given the answered count) and fixed-sequence testing, stopping at the first p-value above δ; no multiplicity correction. A fixed sequence
  needs an order chosen before the data it tests: ``order_fraction`` of the calibration rows (default 20 %)
  set the grid (quantiles of their confidences) *and where the sequence starts*: at the threshold whose
  p-value, projected from the ordering rows to the size of the test rows, is smallest; from there it walks
  towards answering more. Starting at the strictest threshold instead (a handful of rows pass it, one error
  there ends the sequence) abstained on everything in most draws at our sizes; see
  ``benchmarks/ltt_power.py`` for the share answered by each method on identical draws.
- ``sgr`` (Geifman & El-Yaniv, 2017, Algorithm 1): binary search over the sorted calibration confidences,
  ⌈log2 n⌉ Clopper–Pearson bounds at δ/⌈log2 n⌉. As in the paper, the union bound treats the searched
  thresholds as fixed; the result is the least strict tested threshold whose bound is ≤ target.

If no threshold qualifies the threshold is +∞ (abstain on everything) with a warning; in JSON it is
``null`` with ``"answers": "none"``.

Per slice (``groups``): one certificate per value of a slice column with at least ``min_count`` calibration
rows, each at level δ for its own value (like Mondrian conformal: the guarantee holds within every such
value); rows of other values (or without the column) get the global certificate.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from roadwork.errors import InputError, RoadworkWarning, bad_value
from roadwork.jsonio import threshold_from_json, threshold_to_json
from roadwork.trust._checks import check_level

__all__ = [
    "AbstentionCertificate",
    "binomial_pvalue",
    "certify_abstention",
    "clopper_pearson_upper",
    "hoeffding_bentkus_pvalue",
    "rows_needed",
    "smallest_certifiable_risk",
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


def binomial_pvalue(errors: object, n: object, target: float) -> np.ndarray:
    """Exact p-value of H0: risk >= target from ``errors`` 0/1 losses among ``n``: ``P(Binomial(n, target) <=
    errors)``; 1 where n == 0. Valid for 0/1 losses (an error is one), and much stronger than
    :func:`hoeffding_bentkus_pvalue` (whose Bentkus term carries a factor e) at our sizes."""
    from scipy.stats import binom

    k = np.asarray(errors, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    return np.where(n > 0, binom.cdf(k, np.maximum(n, 1), target), 1.0)


def threshold_grid(n_classes: int, m: int = 50) -> np.ndarray:
    """Confidence thresholds from 1/K (answer everything) towards 1, dense near 1 where models live."""
    return 1.0 - (1.0 - 1.0 / n_classes) * np.geomspace(1.0, 1e-4, m)


@dataclass(frozen=True)
class AbstentionCertificate:
    """Answer when calibrated confidence >= ``threshold``; selective risk <= target w.p. >= 1-delta.

    ``groups``: per value of the slice column ``group_by``, its own certificate (see the module docstring)."""

    threshold: float
    target_risk: float
    delta: float
    n: int
    coverage: float  # share of calibration images answered at the threshold
    risk: float  # empirical selective risk on them
    risk_upper_bound: float
    method: str = "ltt"
    group_by: str | None = None
    groups: dict[str, AbstentionCertificate] = field(default_factory=dict)

    @property
    def answers(self) -> str:
        """``"none"`` when nothing could be certified (threshold +inf), else ``"some"``."""
        return "none" if math.isinf(self.threshold) else "some"

    def thresholds(self, groups: object, n: int) -> np.ndarray:
        """Per-row thresholds: a row's group certificate where it has one, the global one otherwise."""
        out = np.full(n, self.threshold)
        if self.groups and groups is not None:
            g = np.asarray(groups).astype(str)
            for value, cert in self.groups.items():
                out[g == value] = cert.threshold
        return out

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "groups"}
        d["threshold"] = threshold_to_json(self.threshold)
        d["answers"] = self.answers
        d["groups"] = {k: v.to_dict() for k, v in self.groups.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AbstentionCertificate:
        return cls(
            threshold=threshold_from_json(d["threshold"]),
            target_risk=float(d["target_risk"]),
            delta=float(d["delta"]),
            n=int(d["n"]),
            coverage=float(d["coverage"]),
            risk=float(d["risk"]),
            risk_upper_bound=float(d["risk_upper_bound"]),
            method=str(d.get("method", "bonferroni")),
            group_by=d.get("group_by"),
            groups={str(k): cls.from_dict(v) for k, v in (d.get("groups") or {}).items()},
        )


def rows_needed(target_risk: float, delta: float) -> int:
    """Answered calibration rows needed to certify ``target_risk`` at ``delta`` even with zero errors:
    ``⌈log δ / log(1 - r)⌉`` (fewer can never reject H0: risk > r)."""
    return math.ceil(math.log(delta) / math.log(1 - target_risk))


def smallest_certifiable_risk(
    confidence: object,
    correct: object,
    delta: float,
    *,
    n_classes: int = 2,
    method: Method = "ltt",
    seed: int = 0,
) -> tuple[float, float]:
    """``(target, answered share)``: the smallest selective-risk target, on a 0.001 grid up to 0.5, at which
    :func:`certify_abstention` with this ``method`` and ``seed`` certifies a threshold on these very rows (``1.0,
    0.0`` when none up to 0.5 does) — the number to try in ``selective.target_risk`` when nothing was certified:
    rerun on the same calibration rows, it answers. Found by bisection (certification is nearly monotone in the
    target; the returned target is checked). A guide for choosing the target, not itself a certificate of
    anything: choosing after looking is what it is for, so certify the chosen target on fresh rows."""
    c = np.asarray(confidence, dtype=np.float64).ravel()
    ok = np.asarray(correct, dtype=bool).ravel()
    if c.size == 0:
        return 1.0, 0.0

    def certify(target: float) -> AbstentionCertificate:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RoadworkWarning)
            return certify_abstention(
                c, ok, target_risk=target, delta=delta, n_classes=n_classes, method=method, seed=seed
            )

    grid = np.round(np.arange(1, 501) / 1000, 3)
    lo, hi = 0, len(grid) - 1
    if math.isinf(certify(float(grid[hi])).threshold):
        return 1.0, 0.0
    while lo < hi:  # the first grid target that certifies something
        mid = (lo + hi) // 2
        if math.isinf(certify(float(grid[mid])).threshold):
            lo = mid + 1
        else:
            hi = mid
    cert = certify(float(grid[lo]))
    return float(grid[lo]), float(cert.coverage)


def _counts(c: np.ndarray, err: np.ndarray, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Accepted and wrong counts at each threshold, via one sort: O((n + m) log n)."""
    order = np.argsort(c, kind="stable")
    c_sorted = c[order]
    err_from_top = np.concatenate([np.cumsum(err[order][::-1])[::-1], [0]])  # errors among c_sorted[i:]
    start = np.searchsorted(c_sorted, grid, side="left")  # first index with c >= threshold
    return len(c) - start, err_from_top[start]


def _check_correct(correct: object, n: int) -> np.ndarray:
    ok = np.asarray(correct).ravel()
    if ok.size != n:
        raise InputError(f"certify_abstention: 'confidence' has {n} rows but 'correct' has {ok.size}.")
    if ok.dtype != bool:
        if not np.issubdtype(ok.dtype, np.number) or not np.isin(ok, (0, 1)).all():
            raise bad_value(
                "correct", "certify_abstention", "booleans (or 0/1): was each answer right", "other values"
            )
        ok = ok.astype(bool)
    return ok


def _ltt(
    c: np.ndarray, err: np.ndarray, r: float, d: float, m: int, order_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, np.ndarray]:
    """Learn-then-Test with the sequence's order and start fixed on held-out ordering rows. Returns the grid,
    accepted and wrong counts on the tested rows, the chosen index (-1: none) and the tested confidences."""
    n_total = c.size
    idx = np.random.default_rng([seed, 11]).permutation(n_total)
    n_order = round(order_fraction * n_total)
    c_order, e_order = c[idx[:n_order]], err[idx[:n_order]]
    test = idx[n_order:]
    c_test, e_test = c[test], err[test]
    if n_order == 0 or len(test) == 0:
        return np.array([]), np.array([0]), np.array([0]), -1, c_test
    levels = np.arange(1, m + 1) / m  # shares of rows answered, as estimated on the ordering rows
    grid = np.unique(np.quantile(c_order, 1 - levels, method="lower"))[::-1]  # strict → answer everything
    n_o, k_o = _counts(c_order, e_order, grid)
    scale = len(test) / n_order
    # projected p-value of each threshold at the test rows' size (a half error added: no false certainty)
    n_proj = np.floor(n_o * scale)
    projected = binomial_pvalue(np.ceil((k_o + 0.5) / np.maximum(n_o, 1) * n_proj - 1e-9), n_proj, r)
    # the same projection at a pessimistic error rate (a one-sided 70 % upper bound on the ordering rows): a
    # threshold that passes even then is one the test rows are unlikely to fail
    cautious = binomial_pvalue(np.ceil(clopper_pearson_upper(k_o, n_o, 0.3) * n_proj - 1e-9), n_proj, r)
    grid = grid[_ltt_sequence(projected, cautious, d)]
    n_acc, k_err = _counts(c_test, e_test, grid)
    pvals = binomial_pvalue(k_err, n_acc, r)
    failed = np.flatnonzero(pvals > d)
    last = (int(failed[0]) if failed.size else len(grid)) - 1  # fixed sequence: stop at the first failure
    j = last if last >= 0 and n_acc[last] > 0 else -1
    return grid, n_acc, k_err, j, c_test


def _ltt_sequence(projected: np.ndarray, cautious: np.ndarray, d: float) -> np.ndarray:
    """The fixed sequence of grid indices (strict → lenient) LTT tests, from the ordering rows' projected
    p-values alone: it starts at the strictest threshold projected to pass even at a pessimistic error rate
    (``cautious`` ≤ δ), so the first test rarely fails on the test rows, skips the thresholds projected to fail (p > δ) up to the last one projected to
    pass — each test in the sequence is a chance to stop — then tries the rest, which can only extend the answer.
    Starting at the most powerful projected point instead failed its first test, and so certified nothing, in up
    to 38 % of draws at n = 300 (benchmarks/ltt_power.py). Without a comfortable start: the most powerful point."""
    comfortable = np.flatnonzero(cautious <= d)
    if not comfortable.size:
        return np.arange(int(np.flatnonzero(projected == projected.min())[-1]), len(projected))
    passing = projected <= d
    keep = np.zeros(len(projected), dtype=bool)
    keep[comfortable[0] :] = passing[comfortable[0] :]
    keep[int(np.flatnonzero(passing)[-1]) + 1 :] = True
    return np.flatnonzero(keep)


def _certify(
    c: np.ndarray,
    err: np.ndarray,
    r: float,
    d: float,
    n_classes: int,
    method: str,
    m: int,
    order_fraction: float,
    seed: int,
    what: str,
) -> AbstentionCertificate:
    n_total = c.size
    if method == "bonferroni":
        grid = threshold_grid(n_classes, m)
        n_acc, k_err = _counts(c, err, grid)
        ucb = clopper_pearson_upper(k_err, n_acc, d / m)
        good = np.flatnonzero((ucb <= r) & (n_acc > 0))
        j = int(good[0]) if good.size else -1  # thresholds increase along the grid: the first answers most
        n_tested = n_total
    elif method == "ltt":
        grid, n_acc, k_err, j, c_test = _ltt(c, err, r, d, m, order_fraction, seed)
        ucb = clopper_pearson_upper(k_err, n_acc, d)  # the bound the binomial test at δ implies
        n_tested = c_test.size
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
        n_tested = n_total

    if j < 0:
        need = rows_needed(r, d)
        warnings.warn(
            f"No confidence threshold certifies selective risk <= {r} at delta={d} with {n_total} calibration "
            f"points{what}: the policy abstains on everything. Even with no errors, {need} answered rows are "
            "needed; raise selective.target_risk, add calibration data, or train a stronger model "
            "(a pretrained backbone).",
            RoadworkWarning,
            stacklevel=3,
        )
        return AbstentionCertificate(math.inf, r, d, n_total, 0.0, 0.0, 1.0, method)
    return AbstentionCertificate(
        float(grid[j]),
        r,
        d,
        n_total,
        float(n_acc[j] / max(n_tested, 1)),
        float(k_err[j] / n_acc[j]),
        float(ucb[j]),
        method,
    )


def certify_abstention(
    confidence: object,
    correct: object,
    *,
    target_risk: float,
    delta: float,
    n_classes: int,
    method: Method = "ltt",
    m: int = 50,
    order_fraction: float = 0.2,
    seed: int = 0,
    groups: object = None,
    group_by: str | None = None,
    min_count: int = 200,
) -> AbstentionCertificate:
    """Certify a confidence threshold on calibration data (see the module docstring).

    ``groups``: one slice value per row (named ``group_by``): values with at least ``min_count`` rows get
    their own certificate, at level ``delta`` each."""
    where = "certify_abstention"
    r = check_level(target_risk, "target_risk", where)
    d = check_level(delta, "delta", where)
    if isinstance(n_classes, bool) or not isinstance(n_classes, int | np.integer) or n_classes < 2:
        raise bad_value("n_classes", where, "an integer >= 2", n_classes)
    if isinstance(m, bool) or not isinstance(m, int | np.integer) or m < 1:
        raise bad_value("m", where, "an integer >= 1 (thresholds on the grid)", m)
    if (
        isinstance(order_fraction, bool)
        or not isinstance(order_fraction, int | float)
        or not 0 < order_fraction < 1
    ):
        raise bad_value("order_fraction", where, "a float in (0, 1)", order_fraction)
    if method not in ("bonferroni", "ltt", "sgr"):
        raise InputError(
            f"The 'method' parameter of certify_abstention must be 'bonferroni', 'ltt' or 'sgr'. "
            f"Got {method!r} instead."
        )
    c = np.asarray(confidence, dtype=np.float64).ravel()
    if not np.isfinite(c).all():
        raise InputError("The 'confidence' parameter of certify_abstention contains NaN or inf.")
    err = ~_check_correct(correct, c.size)
    cert = _certify(c, err, r, d, n_classes, method, m, order_fraction, seed, "")
    if groups is None:
        return cert
    g = np.asarray(groups).astype(str).ravel()
    if g.size != c.size:
        raise InputError(f"certify_abstention: 'confidence' has {c.size} rows but 'groups' has {g.size}.")
    per: dict[str, AbstentionCertificate] = {}
    for value in np.unique(g):
        rows = g == value
        if rows.sum() >= min_count:
            per[str(value)] = _certify(
                c[rows],
                err[rows],
                r,
                d,
                n_classes,
                method,
                m,
                order_fraction,
                seed,
                f" of {group_by}={value}",
            )
    return dataclasses.replace(cert, group_by=group_by, groups=per)
