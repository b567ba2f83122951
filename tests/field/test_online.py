"""Online conformal (quantile tracking) on a drifting stream: the long-run bound, and coverage back in the band
where the static threshold leaves it."""

from __future__ import annotations

import numpy as np
import pytest

from roadwork.field.online import OnlineConformal, shifted
from roadwork.trust.conformal import SplitConformal


def _stream(n: int, rng: np.random.Generator, shift_at: int) -> tuple[np.ndarray, np.ndarray]:
    """Binary probabilities and labels; after ``shift_at`` the model is much less reliable (a new domain)."""
    y = rng.integers(0, 2, n)
    sharp = np.where(np.arange(n) < shift_at, 3.0, 0.8)  # the logit gap the model has on the true class
    z = rng.normal(sharp, 1.0)
    p_true = 1 / (1 + np.exp(-z))
    p = np.where(y[:, None] == np.arange(2)[None, :], p_true[:, None], 1 - p_true[:, None])
    return p, y


def test_online_coverage_stays_in_the_band_where_the_static_threshold_leaves_it():
    rng = np.random.default_rng(0)
    p_cal, y_cal = _stream(2000, rng, shift_at=10**9)
    conf = SplitConformal(alpha=0.1).fit(p_cal, y_cal)
    p, y = _stream(6000, rng, shift_at=3000)
    online = OnlineConformal(alpha=0.1, eta=0.05)
    static_err, online_err = [], []
    for k in range(len(y)):  # one image at a time, its label back at once (the delayed case is below)
        served = shifted(conf, online).predict_sets(p[k : k + 1])[0]
        online_err.append(not served[y[k]])
        static_err.append(not conf.predict_sets(p[k : k + 1])[0][y[k]])
        online.update([("all", online_err[-1])])
    windows = [slice(i, i + 500) for i in range(500, len(y), 500)]
    on = [1 - np.mean(online_err[w]) for w in windows]
    st = [1 - np.mean(static_err[w]) for w in windows]
    assert all(abs(c - 0.9) <= 0.025 for c in on), on
    assert min(st) < 0.9 - 0.025  # the static threshold leaves the band after the shift
    # the deterministic long-run bound, for any stream
    assert abs(np.mean(online_err) - 0.1) <= online.bound("all", score_max=1.0)


def test_groups_and_label_delay_are_tracked_and_the_state_round_trips():
    rng = np.random.default_rng(1)
    online = OnlineConformal(alpha=0.1, eta=0.1)
    pending: list[tuple[str, bool]] = []
    for k in range(3000):
        group = "fog" if k % 3 == 0 else "clear"
        pending.append((group, bool(rng.random() < (0.4 if group == "fog" else 0.05))))
        if len(pending) > 200:  # labels come back 200 answers late
            online.update([pending.pop(0)])
    for g in ("fog", "clear"):
        assert online.labelled[g] > 0 and online.bound(g) is not None
    again = OnlineConformal.from_dict(online.to_dict())
    assert again == online
    with pytest.raises(KeyError):
        OnlineConformal.from_dict({})
