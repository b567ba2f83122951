"""One contract test over every calibrator, plus method-specific checks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from roadwork.errors import InputError, NotFittedError
from roadwork.trust import metrics as M
from roadwork.trust._calibrators import pav
from roadwork.trust._checks import softmax
from roadwork.trust.calibration import METHODS, calibrator_from_dict, make_calibrator


def _miscalibrated(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels follow softmax(z / 2.5 + bias): the raw logits are overconfident and biased."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 4, size=(n, k))
    bias = np.linspace(-0.5, 0.5, k)
    p = softmax(z / 2.5 + bias)
    y = (p.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
    return z, y


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("method", METHODS)
def test_contract(method, k):
    if method == "beta" and k != 2:
        with pytest.raises(InputError, match="Beta calibration is for two classes"):
            make_calibrator(method).fit(*_miscalibrated(100, k, 0))
        return
    z, y = _miscalibrated(6000, k, seed=k)
    cal = make_calibrator(method)
    if method != "none":  # the identity has nothing to fit
        with pytest.raises(NotFittedError):
            cal.predict_proba(z[:3])
    cal.fit(z[:3000], y[:3000])
    probs = cal.predict_proba(z[3000:])
    assert probs.shape == (3000, k) and np.allclose(probs.sum(axis=1), 1.0)
    if method != "none":  # every real calibrator beats the raw, overconfident logits on held-out NLL
        assert M.nll(probs, y[3000:]) < M.nll(softmax(z[3000:]), y[3000:])
    back = calibrator_from_dict(json.loads(json.dumps(cal.to_dict())))
    assert np.array_equal(back.predict_proba(z[3000:]), probs)  # JSON round trip is bit-identical
    again = make_calibrator(method).fit(z[:3000], y[:3000])  # refitting on the same data is idempotent
    assert np.array_equal(again.predict_proba(z[3000:]), probs)


@pytest.mark.parametrize(
    "method",
    ["temperature", "classwise_temperature", "vector", "matrix", "dirichlet", "isotonic", "histogram"],
)
def test_relabelling_classes_permutes_the_output(method):
    z, y = _miscalibrated(3000, 3, seed=11)
    perm = np.array([2, 0, 1])
    a = make_calibrator(method).fit(z, y).predict_proba(z)
    b = make_calibrator(method).fit(z[:, perm], np.argsort(perm)[y]).predict_proba(z[:, perm])
    assert np.allclose(b, a[:, perm], atol=1e-5)


def test_auto_records_why_and_picks_a_good_one():
    z, y = _miscalibrated(4000, 3, seed=5)
    cal = make_calibrator("auto").fit(z, y)
    d = cal.to_dict()
    assert d["kind"] == cal.chosen_ and "cross-validated NLL" in d["selection"]["by"]
    scores = d["selection"]["scores"]
    assert scores[cal.chosen_] == min(scores.values()) and scores["none"] > scores[cal.chosen_]


def test_pav_against_a_brute_force_definition():
    rng = np.random.default_rng(0)
    x = rng.random(200)
    y = (rng.random(200) < x).astype(float)
    knots, values = pav(x, y)
    assert np.all(np.diff(values) >= 0) and np.all(np.diff(knots) > 0)
    fitted = np.interp(np.sort(x), knots, values)
    assert abs(fitted.mean() - y.mean()) < 1e-12  # PAV preserves the mean at the training points
    sk = pytest.importorskip("sklearn.isotonic")
    ref = sk.IsotonicRegression().fit(x, y).predict(np.sort(x))
    assert np.allclose(fitted, ref, atol=1e-12)  # the same fit at every training point


def test_beta_is_monotone_in_the_positive_probability():
    z, y = _miscalibrated(3000, 2, seed=3)
    cal = make_calibrator("beta").fit(z, y)
    grid = np.stack([np.zeros(200), np.linspace(-8, 8, 200)], axis=1)
    q = cal.predict_proba(grid)[:, 1]
    assert np.all(np.diff(q) >= -1e-12) and (cal.coef_[:2] >= 0).all()
