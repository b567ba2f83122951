from __future__ import annotations

import json
import math

import numpy as np
import pytest

from roadwork.errors import InputError, NotFittedError
from roadwork.trust._checks import softmax
from roadwork.trust.risk import FalseNegativeControl, conformal_risk_control


def _binary(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    z = rng.normal(0, 2.5, size=(n, 2))
    p = softmax(z)
    return p, (rng.random(n) < p[:, 1]).astype(int)


def test_expected_miss_rate_is_controlled_over_500_splits():
    alpha, n, m, reps = 0.05, 400, 400, 500
    rng = np.random.default_rng(21)
    fnr = []
    for _ in range(reps):
        p, y = _binary(n + m, rng)
        fn = FalseNegativeControl(alpha=alpha).fit(p[:n], y[:n])
        pos = y[n:] == 1
        fnr.append(float((~fn.predict(p[n:])[pos]).mean()))
    fnr_arr = np.asarray(fnr)
    se = fnr_arr.std(ddof=1) / math.sqrt(reps)
    assert fnr_arr.mean() <= alpha + 3 * se
    # and not trivially conservative: CRC is tight to within about 1/(n_pos + 1)
    assert fnr_arr.mean() >= alpha - 1 / (n / 2 + 1) - 3 * se


def test_generic_crc_matches_the_closed_form():
    rng = np.random.default_rng(0)
    p, y = _binary(300, rng)
    s = p[y == 1, 1]
    grid = np.linspace(0, 1, 2001)  # λ = 1 - t: the loss 1[s < 1 - λ] does not increase with λ
    losses = (s[:, None] < 1 - grid[None, :]).astype(float)
    j = conformal_risk_control(losses, 0.1)
    t = FalseNegativeControl(alpha=0.1).fit(p, y).threshold_
    assert 1 - grid[j] <= t + 1e-3
    assert losses[:, j].sum() + 1 <= 0.1 * (len(s) + 1)


def test_round_trip_and_errors():
    rng = np.random.default_rng(1)
    p, y = _binary(200, rng)
    fn = FalseNegativeControl(alpha=0.1).fit(p, y)
    back = FalseNegativeControl.from_dict(json.loads(json.dumps(fn.to_dict())))
    assert np.array_equal(back.predict(p), fn.predict(p))
    with pytest.raises(NotFittedError):
        FalseNegativeControl().predict(p)
    with pytest.raises(InputError, match="'positive' parameter"):
        FalseNegativeControl(positive=3).fit(p, y)
    with pytest.raises(InputError, match=r"in \[0, bound"):
        conformal_risk_control(np.full((3, 2), 2.0), 0.1)
