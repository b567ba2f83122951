"""The compiled conformal kernels give the numpy reference's sets bit for bit, and validate as check_probs does."""

from __future__ import annotations

import numpy as np
import pytest

from roadwork.errors import InputError
from roadwork.trust import SplitConformal
from roadwork.trust._checks import softmax
from roadwork.trust.conformal import _top_m_sets, class_scores, row_uniforms

pytest.importorskip("numba")
from roadwork.trust import _kernels


def _probs(kind: str, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "peaked":  # a K-class model right about 75 % of the time
        z = rng.normal(0, 1, (n, k))
        z[np.arange(n), rng.integers(0, k, n)] += rng.normal(4.5, 1.5, n)
        return softmax(z)
    if kind == "flat":
        return rng.dirichlet(np.full(k, 50.0), n)
    if kind == "sparse":  # most classes exactly zero
        p = rng.dirichlet(np.full(k, 0.05), n)
        p[p < 1e-3] = 0.0
        return p / p.sum(axis=1, keepdims=True)
    if kind == "ties":  # small integer counts: many equal probabilities, ties straddle every cut
        c = rng.integers(0, 4, (n, k)).astype(float)
        c[:, 0] += 1
        return c / c.sum(axis=1, keepdims=True)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["peaked", "flat", "sparse", "ties"])
@pytest.mark.parametrize("k", [2, 7, 300])
@pytest.mark.parametrize("lam, randomized", [(0.0, False), (0.0, True), (0.02, False), (0.3, True)])
def test_top_m_kernel_equals_reference(kind, k, lam, randomized):
    rng = np.random.default_rng(k * 31 + int(lam * 100) + randomized)
    p = _probs(kind, 400, k, rng)
    u = row_uniforms(p, 3) if randomized else None
    ref_scores = class_scores(p, "raps", u=u, lam=lam, k_reg=2)
    for t in (
        rng.uniform(0, 1.2, len(p)),  # a threshold per row (group Mondrian)
        np.full(len(p), float(np.quantile(ref_scores, 0.3))),
        ref_scores[np.arange(len(p)), rng.integers(0, k, len(p))],  # exactly some class's score: a tie with t
        np.full(len(p), 0.0),
        np.full(len(p), -0.5),
        np.full(len(p), 1.0),
        np.full(len(p), np.inf),
    ):
        ours, ok = _kernels.top_m_sets(p, t, u, lam, 2)
        assert ok
        assert np.array_equal(ours, _top_m_sets(p, t[:, None], u, lam, 2))


@pytest.mark.parametrize("lam, randomized", [(0.0, False), (0.01, False), (0.0, True)])
def test_top_m_kernel_equals_reference_on_long_runs_of_alike_rows(lam, randomized):
    """The first read's cuts follow the rows: runs of benchmark-like rows (the boundary between two cuts), broken by
    rows that send it searching (one class holding everything, uniform rows of ties, flat rows), at K = 999 (not a
    multiple of the 64-class words)."""
    rng = np.random.default_rng(11 + int(lam * 100) + randomized)
    k = 999
    p = _probs("peaked", 3000, k, rng)
    p[rng.choice(3000, 40, replace=False)] = np.eye(k)[rng.integers(0, k, 40)]
    p[1500:1530] = 1.0 / k
    p[2000:2050] = _probs("flat", 50, k, rng)
    u = row_uniforms(p, 3) if randomized else None
    scores = class_scores(p[:500], "raps", u=None if u is None else u[:500], lam=lam, k_reg=2)
    t = np.full(len(p), float(np.quantile(scores[np.arange(500), p[:500].argmax(axis=1)], 0.9)) + 0.2)
    ours, ok = _kernels.top_m_sets(p, t, u, lam, 2)
    assert ok
    reference = _top_m_sets(p, t[:, None], u, lam, 2)
    assert np.array_equal(ours, reference)
    assert 5 < reference.sum(axis=1).mean() < k / 2  # the boundary is inside the rows, not at an end


@pytest.mark.parametrize("score", ["lac", "aps", "raps"])
@pytest.mark.parametrize("mondrian", [None, "group"])
def test_predict_sets_is_the_same_with_and_without_the_kernel(monkeypatch, score, mondrian):
    rng = np.random.default_rng(5)
    p = _probs("peaked", 1200, 50, rng)
    y = p.argmax(axis=1)
    g = rng.choice(["dry", "rain", "snow"], len(p))
    kw = {"groups": g[:600]} if mondrian else {}
    conf = SplitConformal(alpha=0.1, score=score, mondrian=mondrian, randomized=score == "aps")
    conf.fit(p[:600], y[:600], **kw)
    test_kw = {"groups": g[600:]} if mondrian else {}
    monkeypatch.setattr(_kernels, "MIN_SIZE", 1 << 62)
    reference = conf.predict_sets(p[600:], **test_kw)
    monkeypatch.setattr(_kernels, "MIN_SIZE", 0)
    assert np.array_equal(conf.predict_sets(p[600:], **test_kw), reference)
    assert 0.85 < reference[np.arange(600), y[600:]].mean() <= 1.0


@pytest.mark.parametrize("score, randomized", [("lac", False), ("aps", False), ("raps", True)])
def test_kernel_path_rejects_what_check_probs_rejects(monkeypatch, score, randomized):
    rng = np.random.default_rng(1)
    p = _probs("peaked", 200, 10, rng)
    conf = SplitConformal(alpha=0.1, score=score, randomized=randomized).fit(p, p.argmax(axis=1))
    monkeypatch.setattr(_kernels, "MIN_SIZE", 0)
    for bad, match in (
        (np.where(np.arange(10) == 3, np.nan, p), "NaN or inf"),
        (np.where(np.arange(10) == 3, np.inf, p), "NaN or inf"),
        (p * 1.01, "rows sum to 1"),
        (
            p - np.where(np.arange(10) == 0, 0.5, -0.5 / 9),
            "rows sum to 1",
        ),  # a negative entry, rows still sum to 1
    ):
        with pytest.raises(InputError, match=match):
            conf.predict_sets(bad)


def test_kernels_are_off_when_asked(monkeypatch):
    monkeypatch.setenv("ROADWORK_NUMBA", "0")
    assert not _kernels.use_for(np.zeros((1 << 10, 1 << 10)))
    monkeypatch.setenv("ROADWORK_NUMBA", "1")
    assert _kernels.use_for(np.zeros((1 << 10, 1 << 10)))
    assert not _kernels.use_for(np.zeros((64, 2)))  # the server's small batches never start a thread pool


@pytest.mark.parametrize("seed", [0, 3, 2**64 - 1])
def test_top_m_kernel_hashes_rows_into_u_as_row_uniforms_does(seed):
    """With a seed instead of u, the kernel draws each row's u in its one read: the same sets as row_uniforms' u."""
    rng = np.random.default_rng(seed % 1000)
    p = _probs("peaked", 800, 300, rng)
    t = np.full(len(p), 0.6)
    given, ok_given = _kernels.top_m_sets(p, t, row_uniforms(p, seed), 0.01, 2)
    hashed, ok_hashed = _kernels.top_m_sets(p, t, None, 0.01, 2, seed=seed)
    assert ok_given and ok_hashed
    assert np.array_equal(hashed, given)
    assert not np.array_equal(hashed, _kernels.top_m_sets(p, t, None, 0.01, 2)[0])  # u matters here
