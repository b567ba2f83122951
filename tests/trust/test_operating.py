from __future__ import annotations

import json

import numpy as np
import pytest

from roadwork.errors import InputError
from roadwork.trust.operating import OperatingPoint, fit_operating_point


def _data(n: int = 4000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = rng.beta(2, 2, n)
    return p, rng.random(n) < p


def _mcc(p: np.ndarray, y: np.ndarray, t: float) -> float:
    pred = p >= t
    tp, fp = (pred & y).sum(), (pred & ~y).sum()
    fn, tn = (~pred & y).sum(), (~pred & ~y).sum()
    return float((tp * tn - fp * fn) / np.sqrt(float((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))))


def test_max_mcc_beats_every_grid_threshold_and_lands_at_one_half():
    p, y = _data()
    op = fit_operating_point(p, y, criterion="max_mcc")
    assert op.calib_mcc == pytest.approx(_mcc(p, y, op.threshold))
    assert all(op.calib_mcc >= _mcc(p, y, t) - 1e-12 for t in np.linspace(0.05, 0.95, 91))
    assert op.remap(np.array([op.threshold]))[0] == pytest.approx(0.5)
    s = op.remap(np.linspace(0, 1, 101))
    assert s[0] == 0 and s[-1] == pytest.approx(1) and np.all(np.diff(s) > 0)
    # thresholding the remapped score at 0.5 is the operating-point decision
    assert np.array_equal(op.remap(p) >= 0.5, p >= op.threshold)


@pytest.mark.parametrize("criterion", ["precision", "recall"])
def test_precision_and_recall_targets_are_met_on_calibration(criterion):
    p, y = _data(seed=1)
    op = fit_operating_point(p, y, criterion=criterion, target=0.8)
    got = op.calib_precision if criterion == "precision" else op.calib_recall
    assert got >= 0.8
    pred = p >= op.threshold
    assert (pred & y).sum() / (pred.sum() if criterion == "precision" else y.sum()) == pytest.approx(got)
    assert OperatingPoint.from_dict(json.loads(json.dumps(op.to_dict()))) == op


def test_bad_targets_are_explained():
    p, y = _data()
    with pytest.raises(InputError, match="must be a float in"):
        fit_operating_point(p, y, criterion="precision", target=None)
    with pytest.raises(InputError, match="No threshold reaches precision >= 0.6"):
        fit_operating_point(
            np.array([0.9, 0.8, 0.1]), np.array([False, True, False]), criterion="precision", target=0.6
        )
