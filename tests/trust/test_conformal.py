from __future__ import annotations

import json
import math

import numpy as np
import pytest

from roadwork.errors import InputError, NotFittedError, RoadworkWarning
from roadwork.trust import SplitConformal, conformal_quantile
from roadwork.trust._checks import softmax


def test_quantile_is_the_exact_order_statistic():
    s = np.arange(1, 20, dtype=float)  # n = 19, alpha = 0.1: ceil(20 * 0.9) = 18th smallest
    assert conformal_quantile(s, 0.1) == 18.0
    s = np.arange(1, 101, dtype=float)  # n = 100: ceil(101 * 0.9) = 91
    assert conformal_quantile(np.random.default_rng(0).permutation(s), 0.1) == 91.0


def test_too_few_points_give_infinity_and_a_warning():
    with pytest.warns(RoadworkWarning, match="at least 19 are needed"):
        assert math.isinf(conformal_quantile(np.arange(5.0), 0.05))


def _task(n: int, rng: np.random.Generator, k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    z = rng.normal(0, 2, size=(n, k))
    p = softmax(z)
    y = (p.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
    return p, y


def test_coverage_holds_over_many_random_splits():
    """Marginal coverage over R splits lies in [1-α, 1-α+1/(n+1)] up to Monte-Carlo error."""
    alpha, n, m, reps = 0.1, 200, 200, 400
    rng = np.random.default_rng(7)
    cov = np.empty(reps)
    for r in range(reps):
        p, y = _task(n + m, rng)
        conf = SplitConformal(alpha=alpha).fit(p[:n], y[:n])
        cov[r] = conf.predict_sets(p[n:])[np.arange(m), y[n:]].mean()
    # per-split coverage varies as Beta(k, n+1-k) (calibration draw) plus binomial noise (test draw)
    k = math.ceil((n + 1) * (1 - alpha))
    beta_var = k * (n + 1 - k) / ((n + 1) ** 2 * (n + 2))
    se = math.sqrt((beta_var + alpha * (1 - alpha) / m) / reps)
    assert 1 - alpha - 4 * se <= cov.mean() <= 1 - alpha + 1 / (n + 1) + 4 * se


def test_sets_round_trip_and_validate():
    rng = np.random.default_rng(0)
    p, y = _task(300, rng)
    conf = SplitConformal(alpha=0.2).fit(p, y)
    back = SplitConformal.from_dict(json.loads(json.dumps(conf.to_dict())))
    assert np.array_equal(back.predict_sets(p), conf.predict_sets(p))
    with pytest.raises(NotFittedError):
        SplitConformal().predict_sets(p)
    with pytest.raises(
        InputError, match=r"'alpha' parameter of SplitConformal.fit must be a float in \(0, 1\)"
    ):
        SplitConformal(alpha=1.5).fit(p, y)
    with pytest.raises(InputError, match="rows sum to 1"):
        SplitConformal().fit(p * 2, y)


def _se(alpha: float, n: int, m: int, reps: int) -> float:
    """Monte-Carlo standard error of the mean coverage over ``reps`` splits (calibration + test draw)."""
    k = math.ceil((n + 1) * (1 - alpha))
    beta_var = k * (n + 1 - k) / ((n + 1) ** 2 * (n + 2))
    return math.sqrt((beta_var + alpha * (1 - alpha) / m) / reps)


@pytest.mark.parametrize(
    ("score", "randomized"), [("lac", False), ("aps", True), ("aps", False), ("raps", True), ("raps", False)]
)
def test_every_score_covers_over_500_splits(score, randomized):
    alpha, n, m, reps = 0.1, 300, 300, 500
    rng = np.random.default_rng(["lac", "aps", "raps"].index(score) * 2 + int(randomized))
    cov, size = np.empty(reps), np.empty(reps)
    for r in range(reps):
        p, y = _task(n + m, rng, k=6)
        conf = SplitConformal(alpha=alpha, score=score, randomized=randomized, k_reg=1, lam=0.05, seed=r)
        sets = conf.fit(p[:n], y[:n]).predict_sets(p[n:])
        cov[r] = sets[np.arange(m), y[n:]].mean()
        size[r] = sets.sum(axis=1).mean()
    se = _se(alpha, n, m, reps)
    assert cov.mean() >= 1 - alpha - 4 * se
    if randomized or score == "lac":  # exact up to 1/(n+1); the deterministic sets are conservative by design
        assert cov.mean() <= 1 - alpha + 1 / (n + 1) + 4 * se
    assert size.mean() < 6


def test_mondrian_covers_within_every_class():
    alpha, n, m, reps = 0.1, 600, 600, 500
    rng = np.random.default_rng(5)
    hits = np.zeros(3)
    counts = np.zeros(3)
    n_c = []
    for _ in range(reps):
        z = rng.normal(0, 2, size=(n + m, 3)) + np.array([1.5, 0.0, -1.0])  # imbalanced classes
        p = softmax(z)
        y = (p.cumsum(axis=1) > rng.random((n + m, 1))).argmax(axis=1)
        conf = SplitConformal(alpha=alpha, mondrian="class").fit(p[:n], y[:n])
        covered = conf.predict_sets(p[n:])[np.arange(m), y[n:]]
        for c in range(3):
            hits[c] += covered[y[n:] == c].sum()
            counts[c] += (y[n:] == c).sum()
        n_c.append(np.bincount(y[:n], minlength=3))
    per_class = hits / counts
    n_min = int(np.min(n_c))
    for c in range(3):  # test rows pooled across splits: binomial error plus the calibration draw
        se = _se(alpha, n_min, int(counts[c] / reps), reps)
        assert per_class[c] >= 1 - alpha - 4 * se, (c, per_class[c])


def test_no_empty_sets_option_and_raps_tuning():
    rng = np.random.default_rng(3)
    p, y = _task(2000, rng, k=10)
    sets = (
        SplitConformal(alpha=0.4, score="lac", allow_empty=False)
        .fit(p[:1000], y[:1000])
        .predict_sets(p[1000:])
    )
    assert sets.any(axis=1).all()
    tuned = SplitConformal(alpha=0.1, score="raps").fit(p[:1000], y[:1000])
    assert tuned.k_reg_ >= 1 and tuned.lam_ in (0.0, 0.001, 0.01, 0.05, 0.1, 0.2, 0.5)
    assert tuned.n_ == 800  # 20 % of the calibration rows went to tuning


@pytest.mark.parametrize("score", ["lac", "aps", "raps"])
def test_relabelling_permuting_refitting_and_json_give_identical_sets(score):
    rng = np.random.default_rng(9)
    p, y = _task(800, rng, k=4)
    kw = {"alpha": 0.1, "score": score, "k_reg": 1, "lam": 0.1}
    a = SplitConformal(**kw).fit(p[:400], y[:400])
    sets = a.predict_sets(p[400:])
    perm = np.array([3, 1, 0, 2])
    b = SplitConformal(**kw).fit(p[:400][:, perm], np.argsort(perm)[y[:400]])
    assert np.array_equal(b.predict_sets(p[400:][:, perm]), sets[:, perm])
    rows = rng.permutation(400)
    assert SplitConformal(**kw).fit(p[:400][rows], y[:400][rows]).threshold_ == a.threshold_
    assert a.fit(p[:400], y[:400]).threshold_ == b.threshold_
    back = SplitConformal.from_dict(json.loads(json.dumps(a.to_dict())))
    assert np.array_equal(back.predict_sets(p[400:]), sets)


def test_group_mondrian_covers_within_every_group_where_marginal_does_not():
    """Two slices, one much harder (flatter logits): marginal LAC under-covers it; group Mondrian does not."""
    alpha, n, m, reps = 0.1, 800, 800, 300
    rng = np.random.default_rng(17)
    cov = {"marginal": np.zeros(2), "group": np.zeros(2)}
    counts = np.zeros(2)
    for _ in range(reps):
        g = (rng.random(n + m) < 0.3).astype(int)  # 30 % of rows in the hard group 1
        z = rng.normal(0, 3, size=(n + m, 4)) * np.where(g == 1, 0.3, 1.0)[:, None]
        p = softmax(z)
        y = (p.cumsum(axis=1) > rng.random((n + m, 1))).argmax(axis=1)
        gs = np.where(g == 1, "fog", "clear")
        for kind, mond in (("marginal", None), ("group", "group")):
            conf = SplitConformal(alpha=alpha, mondrian=mond).fit(p[:n], y[:n], groups=gs[:n])
            covered = conf.predict_sets(p[n:], groups=gs[n:])[np.arange(m), y[n:]]
            for k in (0, 1):
                cov[kind][k] += covered[g[n:] == k].sum()
        counts += np.bincount(g[n:], minlength=2)
    for k, n_k in ((0, int(0.7 * n)), (1, int(0.3 * n))):
        se = _se(alpha, n_k, int(counts[k] / reps), reps)
        assert cov["group"][k] / counts[k] >= 1 - alpha - 4 * se
    assert (
        cov["marginal"][1] / counts[1] < 1 - alpha - 0.02
    )  # the hard slice is under-covered without Mondrian


def test_group_mondrian_needs_groups_falls_back_for_unseen_ones_and_round_trips():
    rng = np.random.default_rng(2)
    p, y = _task(600, rng)
    groups = np.where(np.arange(600) % 2 == 0, "day", "night")
    conf = SplitConformal(alpha=0.1, mondrian="group")
    with pytest.raises(InputError, match="needs 'groups'"):
        conf.fit(p, y)
    conf.fit(p, y, groups=groups)
    assert set(conf.group_thresholds_) == {"day", "night"}
    unseen = conf.predict_sets(p[:5], groups=np.array(["dusk"] * 5))
    assert np.array_equal(unseen, p[:5] >= 1 - conf.threshold_)  # the global threshold
    back = SplitConformal.from_dict(json.loads(json.dumps(conf.to_dict())))
    assert np.array_equal(back.predict_sets(p, groups=groups), conf.predict_sets(p, groups=groups))


@pytest.mark.parametrize("start", [None, 2])
@pytest.mark.parametrize(("lam", "randomized"), [(0.0, False), (0.05, False), (0.05, True)])
def test_top_m_sets_equal_scoring_every_class(start, lam, randomized):
    """The top-k shortcut (with growth from k=2, and rows of tied probabilities) equals scoring all classes."""
    from roadwork.trust.conformal import _top_m_sets, class_scores, row_uniforms

    rng = np.random.default_rng(3)
    p = softmax(rng.normal(0, 1.5, size=(600, 12)))
    p[:50] = np.repeat(np.array([[0.3, 0.2, 0.2, 0.1, 0.1, 0.1]]), 2, axis=1) / 2  # ties straddling the cut
    u = row_uniforms(p, 4) if randomized else None
    for q in (0.3, 0.62, 0.9, 0.999):
        t = np.full((600, 1), q)
        expected = class_scores(p, "raps", u=u, lam=lam, k_reg=2) <= t
        assert np.array_equal(_top_m_sets(p, t, u, lam, 2, start=start), expected)


def test_row_uniforms_are_uniform_and_invariant():
    from scipy import stats

    from roadwork.trust.conformal import row_uniforms

    p = softmax(np.random.default_rng(0).normal(0, 2, size=(20000, 10)))
    u = row_uniforms(p, 0)
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    assert abs(np.corrcoef(u, p.max(axis=1))[0, 1]) < 4 / np.sqrt(len(u))  # 4 SE of a null correlation
    assert np.array_equal(row_uniforms(p[::-1], 0), u[::-1])  # permuting rows
    assert np.array_equal(row_uniforms(p[:, ::-1], 0), u)  # relabelling classes
    assert not np.array_equal(row_uniforms(p, 1), u)  # the seed matters


@pytest.mark.parametrize(("score", "randomized"), [("lac", False), ("aps", True)])
def test_label_noise_adjustment_restores_nominal_coverage_of_clean_labels(score, randomized):
    """20 % of calibration labels resampled uniformly: plain conformal over-covers the clean test labels; the
    contamination-robust threshold brings mean coverage back to 1-α. Band: the clean-case band plus the
    estimator's O(1/n) allowance 2/((1-ε)(n+1)), each side widened by 4 Monte-Carlo SE over 300 splits."""
    alpha, n, m, eps, k, reps = 0.1, 1000, 1000, 0.2, 4, 300
    rng = np.random.default_rng(23)
    plain, robust = np.empty(reps), np.empty(reps)
    for r in range(reps):
        p = softmax(rng.normal(0, 2.5, size=(n + m, k)))
        y = (p.cumsum(axis=1) > rng.random((n + m, 1))).argmax(axis=1)
        noisy = y[:n].copy()
        hit = rng.random(n) < eps
        noisy[hit] = rng.integers(0, k, hit.sum())
        for out, e in ((plain, 0.0), (robust, eps)):
            conf = SplitConformal(alpha=alpha, score=score, randomized=randomized, label_noise=e, seed=r)
            out[r] = conf.fit(p[:n], noisy).predict_sets(p[n:])[np.arange(m), y[n:]].mean()
    se = robust.std(ddof=1) / np.sqrt(reps)
    allowance = 2 / ((1 - eps) * (n + 1))
    assert 1 - alpha - allowance - 4 * se <= robust.mean() <= 1 - alpha + 1 / (n + 1) + allowance + 4 * se
    assert plain.mean() > 1 - alpha + 0.05  # the problem being solved is real


def test_label_noise_is_checked_and_round_trips():
    p, y = _task(500, np.random.default_rng(2), k=3)
    with pytest.raises(InputError, match="label_noise"):
        SplitConformal(label_noise=1.2).fit(p, y)
    with pytest.raises(InputError, match="mondrian='class'"):
        SplitConformal(label_noise=0.1, mondrian="class").fit(p, y)
    a = SplitConformal(label_noise=0.1).fit(p, y)
    assert a.threshold_ < SplitConformal().fit(p, y).threshold_  # noise-corrected sets are smaller
    assert SplitConformal.from_dict(json.loads(json.dumps(a.to_dict()))).threshold_ == a.threshold_
