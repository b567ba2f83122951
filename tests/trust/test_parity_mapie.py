"""Parity with MAPIE on identical probabilities (MAPIE is in the dev extra; skipped where absent)."""

from __future__ import annotations

import numpy as np
import pytest

from roadwork.trust import SplitConformal
from roadwork.trust._checks import softmax

mapie = pytest.importorskip("mapie.classification")


class _Prefit:
    """A fitted sklearn-style classifier returning stored probabilities; X holds row indices."""

    _estimator_type = "classifier"

    def __init__(self, probs: np.ndarray) -> None:
        self.probs = probs
        self.classes_ = np.arange(probs.shape[1])
        self.n_features_in_ = 1

    def fit(self, x, y):  # type: ignore[no-untyped-def]
        return self

    def predict_proba(self, x):  # type: ignore[no-untyped-def]
        return self.probs[np.asarray(x).ravel().astype(int)]

    def predict(self, x):  # type: ignore[no-untyped-def]
        return self.predict_proba(x).argmax(axis=1)

    def get_params(self, deep=True):  # type: ignore[no-untyped-def]
        return {}


@pytest.mark.parametrize(("k", "alpha"), [(2, 0.1), (10, 0.1), (10, 0.05)])
def test_lac_sets_equal_mapie(k, alpha):
    rng = np.random.default_rng(k)
    n = 1000
    z = rng.normal(0, 2, size=(2 * n, k))
    p = softmax(z)
    y = (p.cumsum(axis=1) > rng.random((2 * n, 1))).argmax(axis=1)
    ours = SplitConformal(alpha=alpha, score="lac").fit(p[:n], y[:n]).predict_sets(p[n:])
    m = mapie.SplitConformalClassifier(
        _Prefit(p), confidence_level=1 - alpha, conformity_score="lac", prefit=True
    )
    m.conformalize(np.arange(n)[:, None], y[:n])
    theirs = np.asarray(m.predict_set(np.arange(n, 2 * n)[:, None])[1])[:, :, 0]
    assert np.array_equal(ours, theirs)


def _mapie_u(seed: int):  # type: ignore[no-untyped-def]
    """MAPIE draws u' ~ RandomState(seed) and scores c_r - u' p; ours is m + u p = c_r - (1 - u) p."""
    return lambda p: 1.0 - np.random.RandomState(seed).uniform(size=len(p))


def _task(k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = softmax(rng.normal(0, 2, size=(2000, k)))
    return p, (p.cumsum(axis=1) > rng.random((2000, 1))).argmax(axis=1)


@pytest.mark.parametrize(("k", "alpha"), [(10, 0.1), (50, 0.05)])
def test_aps_threshold_and_sets_equal_mapie(k, alpha, monkeypatch):
    """Same u: MAPIE's quantile is our threshold, its include_last_label=True sets are our deterministic sets."""
    p, y = _task(k, k)
    m = mapie.SplitConformalClassifier(
        _Prefit(p), confidence_level=1 - alpha, conformity_score="aps", prefit=True, random_state=5
    )
    m.conformalize(np.arange(1000)[:, None], y[:1000])
    theirs = np.asarray(m.predict_set(np.arange(1000, 2000)[:, None])[1])[:, :, 0]
    ours = SplitConformal(alpha=alpha, score="aps")
    monkeypatch.setattr(ours, "_u", _mapie_u(5))
    ours.fit(p[:1000], y[:1000])
    assert ours.threshold_ == pytest.approx(
        m._mapie_classifier.conformity_score_function_.quantiles_[0], abs=1e-12
    )
    assert np.array_equal(ours.predict_sets(p[1000:]), theirs)


def test_raps_threshold_equals_mapie_and_sets_differ_only_by_its_penalty_rank(monkeypatch):
    """MAPIE tunes k* and λ* on its own 10 % split; fitted with those and the same rows and u, our threshold is
    its quantile. Its sets test ``m_k + λ(r_k - 1 - k*)^+``, ours ``m_k + λ(r_k - k*)^+``: ours are subsets, and
    shifting k_reg by one rank reproduces MAPIE's exactly."""
    from sklearn.model_selection import StratifiedShuffleSplit

    from roadwork.trust.conformal import _top_m_sets

    p, y = _task(10, 3)
    m = mapie.SplitConformalClassifier(
        _Prefit(p), confidence_level=0.9, conformity_score="raps", prefit=True, random_state=5
    )
    x = np.arange(1000)[:, None]
    m.conformalize(x, y[:1000])
    theirs = np.asarray(m.predict_set(np.arange(1000, 2000)[:, None])[1])[:, :, 0]
    score_fn = m._mapie_classifier.conformity_score_function_  # k* and λ* are set by predict_set
    k_star, lam = int(score_fn.k_star[0]), float(score_fn.lambda_star)
    train, _ = next(StratifiedShuffleSplit(1, test_size=None, random_state=5).split(x, y[:1000]))
    ours = SplitConformal(alpha=0.1, score="raps", k_reg=k_star, lam=lam)
    monkeypatch.setattr(ours, "_u", _mapie_u(5))
    ours.fit(p[train], y[train])
    q = ours.threshold_
    assert q == pytest.approx(score_fn.quantiles_[0], abs=1e-12)
    sets = ours.predict_sets(p[1000:])
    assert lam > 0 and not (sets & ~theirs).any() and (theirs & ~sets).any()
    assert np.array_equal(_top_m_sets(p[1000:], np.array([[q]]), None, lam, k_star + 1), theirs)
