from __future__ import annotations

import json

import numpy as np
import pytest

from roadwork.errors import InputError, NotFittedError
from roadwork.trust import IdentityCalibrator, TemperatureScaler
from roadwork.trust._checks import softmax
from roadwork.trust.calibration import calibrator_from_dict


def _overconfident(n: int, k: int, t_true: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose labels are drawn from softmax(z / t_true): the right temperature is t_true."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 3, size=(n, k))
    p = softmax(z / t_true)
    y = (p.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
    return z, y


@pytest.mark.parametrize("t_true", [0.5, 2.0])
def test_temperature_recovers_the_true_temperature(t_true):
    z, y = _overconfident(20000, 5, t_true, seed=1)
    t = TemperatureScaler().fit(z, y).temperature_
    assert abs(np.log(t) - np.log(t_true)) < 0.05


def test_temperature_minimises_nll_against_a_grid():
    z, y = _overconfident(3000, 3, 1.7, seed=2)
    t = TemperatureScaler().fit(z, y).temperature_

    def nll(temp: float) -> float:
        return float(-np.log(softmax(z / temp)[np.arange(len(y)), y]).mean())

    assert all(nll(t) <= nll(g) + 1e-9 for g in np.linspace(0.5, 4, 71))


def test_json_round_trip_is_exact():
    z, y = _overconfident(500, 4, 1.3, seed=3)
    cal = TemperatureScaler().fit(z, y)
    back = calibrator_from_dict(json.loads(json.dumps(cal.to_dict())))
    assert np.array_equal(back.predict_proba(z), cal.predict_proba(z))
    assert calibrator_from_dict(IdentityCalibrator().to_dict()).predict_proba(z).shape == z.shape


def test_unfitted_nan_and_bad_labels_are_explained():
    with pytest.raises(NotFittedError, match="TemperatureScaler instance is not fitted yet"):
        TemperatureScaler().predict_proba(np.zeros((2, 2)))
    with pytest.raises(InputError, match="contains NaN or inf in 1 row"):
        TemperatureScaler().fit(np.array([[0.0, np.nan], [1.0, 0.0]]), np.array([0, 1]))
    with pytest.raises(InputError, match=r"class indices in \[0, 1\]"):
        TemperatureScaler().fit(np.zeros((2, 2)), np.array([0, 2]))
    with pytest.raises(InputError, match=r"shape \(n_samples, n_classes\)"):
        TemperatureScaler().fit(np.zeros(4), np.zeros(4, int))


def test_invariant_to_relabelling_classes():
    z, y = _overconfident(2000, 4, 1.5, seed=4)
    perm = np.array([2, 0, 3, 1])
    inv = np.argsort(perm)
    a = TemperatureScaler().fit(z, y).temperature_
    b = TemperatureScaler().fit(z[:, perm], inv[y]).temperature_
    assert a == pytest.approx(b, rel=1e-6)
