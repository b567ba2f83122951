from __future__ import annotations

import json
import math

import numpy as np
import pytest

from roadwork.errors import InputError, NotFittedError, RoadworkWarning
from roadwork.trust import LACConformal, conformal_quantile
from roadwork.trust._checks import softmax


def test_quantile_is_the_exact_order_statistic():
    s = np.arange(1, 20, dtype=float)  # n = 19, alpha = 0.1: ceil(20 * 0.9) = 18th smallest
    assert conformal_quantile(s, 0.1) == 18.0
    s = np.arange(1, 101, dtype=float)  # n = 100: ceil(101 * 0.9) = 91
    assert conformal_quantile(np.random.default_rng(0).permutation(s), 0.1) == 91.0


def test_too_few_points_give_infinity_and_a_warning():
    with pytest.warns(RoadworkWarning, match="at least 19 are needed"):
        assert math.isinf(conformal_quantile(np.arange(5.0), 0.05))


def _task(n: int, rng: np.random.Generator, k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    z = rng.normal(0, 2, size=(n, k))
    p = softmax(z)
    y = (p.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
    return p, y


def test_coverage_holds_over_many_random_splits():
    """Marginal coverage over R splits lies in [1-α, 1-α+1/(n+1)] up to Monte-Carlo error."""
    alpha, n, m, reps = 0.1, 200, 200, 400
    rng = np.random.default_rng(7)
    cov = np.empty(reps)
    for r in range(reps):
        p, y = _task(n + m, rng)
        conf = LACConformal(alpha=alpha).fit(p[:n], y[:n])
        cov[r] = conf.predict_sets(p[n:])[np.arange(m), y[n:]].mean()
    # per-split coverage varies as Beta(k, n+1-k) (calibration draw) plus binomial noise (test draw)
    k = math.ceil((n + 1) * (1 - alpha))
    beta_var = k * (n + 1 - k) / ((n + 1) ** 2 * (n + 2))
    se = math.sqrt((beta_var + alpha * (1 - alpha) / m) / reps)
    assert 1 - alpha - 4 * se <= cov.mean() <= 1 - alpha + 1 / (n + 1) + 4 * se


def test_sets_round_trip_and_validate():
    rng = np.random.default_rng(0)
    p, y = _task(300, rng)
    conf = LACConformal(alpha=0.2).fit(p, y)
    back = LACConformal.from_dict(json.loads(json.dumps(conf.to_dict())))
    assert np.array_equal(back.predict_sets(p), conf.predict_sets(p))
    with pytest.raises(NotFittedError):
        LACConformal().predict_sets(p)
    with pytest.raises(
        InputError, match=r"'alpha' parameter of LACConformal.fit must be a float in \(0, 1\)"
    ):
        LACConformal(alpha=1.5).fit(p, y)
    with pytest.raises(InputError, match="rows sum to 1"):
        LACConformal().fit(p * 2, y)
