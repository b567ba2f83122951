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
