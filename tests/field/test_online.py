"""Online control on a drifting stream: the sets' long-run bound and coverage back in the band where the static
threshold leaves it; the abstention's long-run selective risk at most its target plus the bound; the miss rate's."""

from __future__ import annotations

import numpy as np
import pytest

from roadwork.field.online import OnlineControl, Outcome, shifted, shifted_sets
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
    online = OnlineControl(alpha=0.1, eta=0.05)
    static_err, online_err = [], []
    for k in range(len(y)):  # one image at a time, its label back at once (the delayed case is below)
        served = shifted_sets(conf, online).predict_sets(p[k : k + 1])[0]
        online_err.append(not served[y[k]])
        static_err.append(not conf.predict_sets(p[k : k + 1])[0][y[k]])
        online.update([Outcome(covered=not online_err[-1], answered=True, wrong=False)])
    windows = [slice(i, i + 500) for i in range(500, len(y), 500)]
    on = [1 - np.mean(online_err[w]) for w in windows]
    st = [1 - np.mean(static_err[w]) for w in windows]
    assert all(abs(c - 0.9) <= 0.025 for c in on), on
    assert min(st) < 0.9 - 0.025  # the static threshold leaves the band after the shift
    # the deterministic long-run bound, for any stream
    assert abs(np.mean(online_err) - 0.1) <= online.bound("sets", scale=1.0)
    assert online.rate("sets") == pytest.approx(np.mean(online_err))


def test_groups_and_label_delay_are_tracked_and_the_state_round_trips():
    rng = np.random.default_rng(1)
    online = OnlineControl(alpha=0.1, eta=0.1, target_risk=0.05)
    pending: list[Outcome] = []
    for k in range(3000):
        group = "fog" if k % 3 == 0 else "clear"
        miss = bool(rng.random() < (0.4 if group == "fog" else 0.05))
        pending.append(Outcome(covered=not miss, answered=k % 2 == 0, wrong=miss, groups={"sets": group}))
        if len(pending) > 200:  # labels come back 200 answers late
            online.update([pending.pop(0)])
    for g in ("fog", "clear"):
        assert online.updates["sets"][g] > 0 and online.bound("sets", g) is not None
    assert online.updates["abstain"]["all"] == sum(
        k % 2 == 0 for k in range(3000 - 200)
    )  # answered ones only
    assert online.offset("sets", "snow") == online.offset("sets", "all") == 0.0  # no labels for the group yet
    again = OnlineControl.from_dict(online.to_dict())
    assert again == online
    with pytest.raises(KeyError):
        OnlineControl.from_dict({})


def _certified(threshold: float, target: float):  # type: ignore[no-untyped-def]
    from roadwork.trust.selective import AbstentionCertificate

    return AbstentionCertificate(threshold, target, 0.05, 1000, 0.8, target / 2, target)


def test_online_abstention_holds_the_selective_risk_after_a_shift_that_breaks_the_certificate():
    """Confidence is honest before the shift and overconfident after it: the certified threshold's error on
    answered climbs far above the target; online control keeps the long-run selective risk within target + the
    bound, and its answered share shrinks instead."""
    import types

    rng = np.random.default_rng(3)
    target, n = 0.05, 20_000
    conf = rng.uniform(0.5, 1.0, n)
    p_wrong = np.where(np.arange(n) < n // 4, 1 - conf, np.minimum(1.0, 1.5 * (1 - conf) + 0.01))
    wrong = rng.random(n) < p_wrong
    policy = types.SimpleNamespace(
        conformal=SplitConformal(alpha=0.1).fit(
            np.eye(2)[rng.integers(0, 2, 200)] * 0.8 + 0.1, rng.integers(0, 2, 200)
        ),
        abstention=_certified(0.9, target),
        risk_control=None,
    )
    online = OnlineControl(alpha=0.1, eta=0.05, target_risk=target, scales={"abstain": 1 - 0.9})
    static_wrong, online_wrong, answered = [], [], 0
    pending: list[Outcome] = []
    for k in range(n):
        t = shifted(policy, online)["abstention"].threshold
        if conf[k] >= 0.9:
            static_wrong.append(wrong[k])
        ans = conf[k] >= t
        answered += ans
        if ans:
            online_wrong.append(wrong[k])
        pending.append(Outcome(covered=True, answered=bool(ans), wrong=bool(wrong[k])))
        if len(pending) > 200:
            online.update([pending.pop(0)])
    assert np.mean(static_wrong) > target + 0.02  # the certificate no longer holds after the shift
    assert online.rate("abstain") <= target + online.bound("abstain", scale=1 - 0.9, delay=200)
    # measured: the delay's worst case is far from what happens
    assert online.rate("abstain") <= target + 0.01
    assert np.mean(online_wrong) <= target + 0.01
    assert 0.05 < answered / n < 0.5


def test_online_miss_rate_control_flags_more_when_positives_are_missed():
    from roadwork.trust.risk import FalseNegativeControl

    rng = np.random.default_rng(4)
    n = 6000
    y = rng.integers(0, 2, n)
    score = np.clip(np.where(y == 1, rng.normal(0.7, 0.15, n), rng.normal(0.3, 0.15, n)), 0, 1)
    p = np.stack([1 - score, score], axis=1)
    fnr = FalseNegativeControl(alpha=0.05, positive=1).fit(p[:2000], y[:2000])
    policy = __import__("types").SimpleNamespace(
        conformal=SplitConformal(alpha=0.1).fit(p[:2000], y[:2000]),
        abstention=_certified(0.9, 0.05),
        risk_control=fnr,
    )
    online = OnlineControl(alpha=0.1, eta=0.05, miss_alpha=0.05)
    shift = np.clip(score[2000:] - 0.2 * (y[2000:] == 1), 0, 1)  # positives look weaker after the shift
    q = np.stack([1 - shift, shift], axis=1)
    static_miss, online_miss = [], []
    for k in range(len(q)):
        flag = bool(shifted(policy, online)["risk_control"].predict(q[k : k + 1])[0])
        if y[2000 + k] == 1:
            static_miss.append(not fnr.predict(q[k : k + 1])[0])
            online_miss.append(not flag)
            online.update([Outcome(covered=True, answered=False, wrong=False, missed=not flag)])
    assert np.mean(static_miss) > 0.1
    assert online.rate("miss") <= 0.05 + online.bound("miss", scale=fnr.threshold_)
    assert online.rate("miss") <= 0.05 + 0.01
    assert np.mean(online_miss) == pytest.approx(online.rate("miss"))
