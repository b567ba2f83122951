"""Bad input at the trust layer's boundary: our InputError naming the argument and the fix, never IndexError,
ZeroDivisionError or a silent number."""

from __future__ import annotations

import numpy as np
import pytest

from roadwork.errors import InputError
from roadwork.trust import SplitConformal, certify_abstention, make_calibrator
from roadwork.trust.conformal import conformal_quantile


def _task(n: int = 200, k: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    z = rng.normal(0, 1, (n, k))
    z[np.arange(n), y] += 2
    return z, y


@pytest.mark.parametrize("method", ["isotonic", "histogram"])
def test_one_vs_rest_calibrators_refuse_another_class_count(method):
    z, y = _task()
    cal = make_calibrator(method).fit(z, y)
    with pytest.raises(InputError, match="'logits'.*3 columns"):
        cal.predict_proba(np.zeros((4, 5)))


@pytest.mark.parametrize(
    ("kw", "name"),
    [({"n_classes": 0}, "n_classes"), ({"m": 0}, "m"), ({"order_fraction": 1.5}, "order_fraction")],
)
def test_certify_abstention_names_a_bad_parameter(kw, name):
    c = np.linspace(0.5, 1, 100)
    args = {"target_risk": 0.05, "delta": 0.05, "n_classes": 2, **kw}
    with pytest.raises(InputError, match=f"'{name}'"):
        certify_abstention(c, c > 0.6, **args)


def test_correct_must_be_booleans():
    c = np.linspace(0.5, 1, 100)
    with pytest.raises(InputError, match="'correct'"):
        certify_abstention(c, np.full(100, 0.3), target_risk=0.05, delta=0.05, n_classes=2)
    cert = certify_abstention(c, (c > 0.55).astype(int), target_risk=0.3, delta=0.05, n_classes=2)
    assert np.isfinite(cert.threshold)  # 0/1 integers are fine


def test_conformal_quantile_refuses_nan_scores():
    with pytest.raises(InputError, match="NaN"):
        conformal_quantile(np.array([0.1, np.nan, 0.3] * 10), 0.1)


@pytest.mark.parametrize(
    ("kw", "name"),
    [
        ({"tune_fraction": 1.5}, "tune_fraction"),
        ({"tune_fraction": -1}, "tune_fraction"),
        ({"lam": -0.1}, "lam"),
        ({"k_reg": -1}, "k_reg"),
    ],
)
def test_raps_parameters_are_checked(kw, name):
    z, y = _task()
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    with pytest.raises(InputError, match=f"'{name}'"):
        SplitConformal(alpha=0.1, score="raps", **kw).fit(p, y)


def test_float16_probabilities_get_a_dtype_hint():
    z, y = _task()
    p = (np.exp(z) / np.exp(z).sum(1, keepdims=True)).astype(np.float16)
    if np.all(np.abs(p.astype(np.float64).sum(1) - 1) <= 1e-6):
        pytest.skip("these float16 rows happen to sum to 1")
    with pytest.raises(InputError, match="float16"):
        SplitConformal(alpha=0.1).fit(p, y)
