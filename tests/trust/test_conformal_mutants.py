"""Tests that kill the mutants of ``trust/conformal.py`` the first mutation run left alive (issue 20).

Each test names the mutant class it kills; the table of mutants and the test that kills each is in
CHANGELOG.md (issue 20). They pin exact order statistics, so a mutant that moves the boundary by one rank fails.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from roadwork.errors import RoadworkWarning
from roadwork.trust import SplitConformal, conformal_quantile
from roadwork.trust.conformal import robust_quantile


def _no_warning(fn, *args):  # type: ignore[no-untyped-def]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RoadworkWarning)
        return fn(*args)


def test_n9_alpha01_is_the_last_finite_threshold_and_n8_the_first_infinite_one():
    """Mutant class: the infinity boundary (``k > n`` → ``k >= n`` / ``k > n + 1``, or the rank off by one).

    ⌈(n+1)(1-α)⌉ = ⌈10·0.9⌉ = 9 = n: the threshold is the largest of the 9 scores, finite, without a warning;
    at n = 8 the rank ⌈9·0.9⌉ = 9 exceeds n and the threshold is +∞ with the warning (1/α - 1 = 9 points needed).
    """
    s = np.random.default_rng(0).permutation(np.arange(1.0, 10.0))
    assert _no_warning(conformal_quantile, s, 0.1) == 9.0
    with pytest.warns(
        RoadworkWarning, match="8 calibration points are too few for alpha=0.1: at least 9 are needed"
    ):
        assert math.isinf(conformal_quantile(s[s != 9.0], 0.1))
    # the same boundary one level further: n = 19 at alpha = 0.05 is finite, n = 18 is not
    assert _no_warning(conformal_quantile, np.arange(1.0, 20.0), 0.05) == 19.0
    with pytest.warns(RoadworkWarning, match="at least 19 are needed"):
        assert math.isinf(conformal_quantile(np.arange(1.0, 19.0), 0.05))


def test_the_rank_is_taken_before_float_error_pushes_it_up():
    """Mutant class: the epsilon of ``ceil((n+1)(1-α) - 1e-12)`` removed. (9+1)·(1-0.7) is 3.0000000000000004 in
    floating point; the rank is 3, not 4."""
    assert (9 + 1) * (1 - 0.7) > 3  # the float error this guards against is real
    assert conformal_quantile(np.arange(1.0, 10.0), 0.7) == 3.0
    assert conformal_quantile(np.arange(1.0, 30.0), 0.7) == 9.0  # 30 * 0.3 = 9.000000000000002


def test_fit_at_the_boundary_gives_finite_sets_and_one_point_fewer_gives_full_sets():
    """Mutant class: the boundary as the estimator sees it (``threshold_`` and ``to_dict()['sets']``)."""
    p = np.full((9, 3), 1 / 3)
    p[:, 0] += np.linspace(0.01, 0.3, 9)
    p /= p.sum(axis=1, keepdims=True)
    y = np.zeros(9, dtype=int)
    fitted = _no_warning(SplitConformal(alpha=0.1).fit, p, y)
    assert fitted.threshold_ == pytest.approx(1 - p[:, 0].min()) and fitted.to_dict()["sets"] == "thresholded"
    with pytest.warns(RoadworkWarning, match="too few"):
        eight = SplitConformal(alpha=0.1).fit(p[1:], y[1:])
    assert math.isinf(eight.threshold_) and eight.to_dict()["sets"] == "full"
    assert eight.predict_sets(p).all()


@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.2, 0.3])
@pytest.mark.parametrize("n", [9, 10, 19, 37, 100, 250])
def test_robust_quantile_at_vanishing_noise_is_the_conformal_order_statistic(n, alpha):
    """Mutant class: the noise-robust ``(n + 1) / n`` factor (dropped, inverted, or ``(n - 1) / n``).

    With ``all_scores`` equal to the true-class scores the uniform-label CDF equals the observed one, so the
    clean CDF estimate is exactly ``i / n`` for the ``i``-th smallest score at any ε; the smallest ``i`` with
    ``i / n >= (1 - α)(n + 1) / n`` is ⌈(n+1)(1-α)⌉, the conformal rank. Without the factor the rule picks
    ⌈n(1-α)⌉, one rank lower for almost every ``(n, α)`` here.
    """
    s = np.random.default_rng(n).permutation(np.arange(1.0, n + 1.0))
    k = math.ceil((n + 1) * (1 - alpha) - 1e-12)
    if k > n:
        with pytest.warns(RoadworkWarning):
            assert math.isinf(robust_quantile(s, s[:, None], alpha, 0.2))
        return
    assert _no_warning(robust_quantile, s, s[:, None], alpha, 0.2) == float(k)
    assert _no_warning(robust_quantile, s, s[:, None], alpha, 0.2) == _no_warning(
        conformal_quantile, s, alpha
    )


def test_robust_quantile_infinity_boundary_is_the_clean_one():
    """Mutant class: the ``(n + 1) / n`` factor at the boundary — n = 9, α = 0.1 needs all nine points
    (9/9 >= 0.9 · 10/9 = 1) and is finite; n = 8 is +∞ with the warning. Dropping the factor makes n = 8
    finite (8/8 >= 0.9)."""
    s = np.arange(1.0, 10.0)
    assert _no_warning(robust_quantile, s, s[:, None], 0.1, 0.1) == 9.0
    with pytest.warns(RoadworkWarning, match="label_noise=0.1 are too few for alpha=0.1"):
        assert math.isinf(robust_quantile(s[:8], s[:8, None], 0.1, 0.1))


def test_robust_quantile_subtracts_the_uniform_label_share():
    """Mutant class: the CDF correction ``(F̃ - ε F_U) / (1 - ε)`` (sign, or the division, changed). Scores
    1..10 with every class's scores 6..15: ``F_U`` is 0 up to 5, so the clean CDF is ``F̃ / (1 - ε)`` there and
    the threshold falls to the smallest ``i`` with ``(i/10) / 0.5 >= 0.9 · 11/10``, ``i = 5`` (plain: 10). With
    every class's scores equal to the true class's the correction cancels (``F̂ = F̃``) and the plain rank
    (10) is kept; adding ``ε F_U`` instead would triple ``F̂`` and pick 4."""
    s = np.arange(1.0, 11.0)
    ref = np.arange(6.0, 16.0)[:, None]
    assert _no_warning(robust_quantile, s, ref, 0.1, 0.5) == 5.0
    assert _no_warning(conformal_quantile, s, 0.1) == 10.0
    assert _no_warning(robust_quantile, s, s[:, None], 0.1, 0.5) == 10.0
