from __future__ import annotations

import numpy as np
import pytest

from roadwork.trust import metrics as M
from roadwork.trust._checks import softmax


@pytest.fixture
def task():
    rng = np.random.default_rng(0)
    p = softmax(rng.normal(0, 2, (500, 3)))
    y = rng.integers(0, 3, 500)
    return p, y


def test_against_scikit_learn(task):
    sk = pytest.importorskip("sklearn.metrics")
    p, y = task
    assert M.accuracy(p, y) == pytest.approx(sk.accuracy_score(y, p.argmax(1)))
    assert M.mcc(p, y) == pytest.approx(sk.matthews_corrcoef(y, p.argmax(1)))
    assert M.nll(p, y) == pytest.approx(sk.log_loss(y, p, labels=[0, 1, 2]))
    assert M.auroc(p, y) == pytest.approx(sk.roc_auc_score(y, p, multi_class="ovr", average="macro"))
    pb = softmax(np.random.default_rng(1).normal(0, 2, (400, 2)))
    yb = np.random.default_rng(2).integers(0, 2, 400)
    assert M.auroc(pb, yb) == pytest.approx(sk.roc_auc_score(yb, pb[:, 1]))
    assert np.array_equal(M.confusion_matrix(y, p.argmax(1), 3), sk.confusion_matrix(y, p.argmax(1)))


def test_ece_by_hand():
    # two bins used: conf 0.9 (2 images, 1 right) and 0.6 (2 images, 2 right)
    p = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.4, 0.6]])
    y = np.array([0, 1, 1, 1])
    assert M.ece(p, y, n_bins=10) == pytest.approx(0.5 * abs(0.5 - 0.9) + 0.5 * abs(1.0 - 0.6))


def test_brier_and_risk_coverage():
    p = np.array([[1.0, 0.0], [0.5, 0.5]])
    y = np.array([0, 1])
    assert M.brier(p, y) == pytest.approx((0 + 0.5) / 2)
    cov, risk = M.risk_coverage(np.array([0.9, 0.8, 0.7]), np.array([True, False, True]))
    assert np.allclose(cov, [1 / 3, 2 / 3, 1]) and np.allclose(risk, [0, 0.5, 1 / 3])
    assert M.aurc(np.array([0.9, 0.8, 0.7]), np.array([True, False, True])) == pytest.approx(
        (0 + 0.5 + 1 / 3) / 3
    )


def test_equal_mass_ece_mce_and_classwise_by_hand():
    p = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.4, 0.6]])
    y = np.array([0, 1, 1, 1])
    # two equal-mass bins: {0.6, 0.6} all right, {0.9, 0.9} half right
    assert M.ece_equal_mass(p, y, n_bins=2) == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)
    assert M.mce(p, y, n_bins=10) == pytest.approx(0.4)
    # class 1 probabilities 0.1, 0.1 (one hit) and 0.6, 0.6 (two hits); class 0 mirrors class 1
    per_class = (abs(1 - 0.2) + abs(2 - 1.2)) / 4
    assert M.classwise_ece(p, y, n_bins=10) == pytest.approx(per_class)


def test_bootstrap_interval_contains_the_estimate_and_narrows_with_n():
    rng = np.random.default_rng(0)
    p = softmax(rng.normal(0, 2, (4000, 3)))
    y = (p.cumsum(axis=1) > rng.random((4000, 1))).argmax(axis=1)
    lo, hi = M.bootstrap_ci(M.accuracy, p, y, n_boot=200)
    assert lo <= M.accuracy(p, y) <= hi
    lo_s, hi_s = M.bootstrap_ci(M.accuracy, p[:400], y[:400], n_boot=200)
    assert hi - lo < hi_s - lo_s
