"""Every installed boosting framework converts to roadwork's tree table without changing its scores."""

from __future__ import annotations

import json

import numpy as np
import pytest

from roadwork.errors import ConfigError, InputError
from roadwork.models.boosting import (
    FRAMEWORKS,
    BoostingParams,
    available_frameworks,
    fit_booster,
    native_raw,
    to_trees,
)
from roadwork.models.trees import TreeEnsemble

INSTALLED = [f for f, ok in available_frameworks().items() if ok]


def _data(k: int, n: int = 600, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Half the columns take few distinct values (like pixel fractions k/1024): thresholds then fall next to
    data values, where comparing in the wrong precision sends rows the wrong way."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 12)).astype(np.float32)
    x[:, 6:] = np.round(rng.random((n, 6)) * 1024) / 1024
    y = (x[:, 0] + x[:, 1] ** 2 + 2 * x[:, 6] > 2).astype(int)
    if k == 3:
        y = y + (x[:, 2] > 0.7)
    return x, y


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("framework", INSTALLED)
def test_tree_table_reproduces_framework_scores(framework: str, k: int) -> None:
    x, y = _data(k)
    model = fit_booster(framework, x[:400], y[:400], k, BoostingParams(rounds=20, max_depth=4))
    trees = to_trees(framework, model, x[:64])
    ref = native_raw(framework, model, x[400:])
    assert trees.n_classes == k
    np.testing.assert_allclose(trees.raw(x[400:]), ref, atol=1e-5)
    back = TreeEnsemble.from_dict(json.loads(json.dumps(trees.to_dict())))
    np.testing.assert_array_equal(back.raw(x[400:]), trees.raw(x[400:]))
    z = trees.logits(x[400:])
    assert z.shape == (200, k)
    acc = (z.argmax(1) == y[400:]).mean()
    assert acc > 0.7  # the task is learnable; a scrambled conversion would sit near chance


def test_missing_values_follow_the_default_direction() -> None:
    x, y = _data(2)
    model = fit_booster("sklearn", x[:400], y[:400], 2, BoostingParams(rounds=10, max_depth=3))
    trees = to_trees("sklearn", model, x[:64])
    xn = x[400:].copy()
    xn[::3, 0] = np.nan
    np.testing.assert_allclose(trees.raw(xn), native_raw("sklearn", model, xn), atol=1e-9)


def test_bad_inputs_raise_clear_errors() -> None:
    x, y = _data(2)
    with pytest.raises(ConfigError, match="unknown"):
        fit_booster("gbm9000", x, y, 2, BoostingParams())
    trees = to_trees("sklearn", fit_booster("sklearn", x, y, 2, BoostingParams(rounds=3)), x[:8])
    with pytest.raises(InputError, match=r"\(n, 12\)"):
        trees.raw(x[:, :5])
    assert set(FRAMEWORKS) >= set(INSTALLED)
