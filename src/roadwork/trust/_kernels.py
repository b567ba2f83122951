"""Optional compiled kernels for large conformal predictions (numba; ``pip install 'roadwork[fast]'``).

The numpy implementations in :mod:`roadwork.trust.conformal` are the definition; these kernels compute the same
sets, bit for bit, in one read of the probabilities (the validation sums of ``check_probs`` come out of the same
read). They are used for inputs of at least :data:`MIN_SIZE` entries when numba imports and ``ROADWORK_NUMBA`` is not
``0``; tests run both paths on the same inputs and compare them.

APS/RAPS per row, without sorting the row. The score of the class at rank ``r`` (classes by decreasing
probability, ties by index) is ``before_r [+ u v_r] [+ λ (r - k_reg)^+]`` with ``before_r`` the mass ranked before
it; it never decreases with the rank, so the set is the top ``m`` classes. Vectorised passes over the row (each a
masked sum and count, cheap once the row is in L1) bracket the boundary between two probability cuts:

- below ``lo`` everything is out: a class there has at least the mass at or above ``lo`` before it and a rank past
  the count at or above ``lo``, so its score exceeds ``t``;
- at or above ``hi`` everything is in: that block's mass plus its last rank's penalty is at most ``t``.

Only the few classes between the cuts are sorted and scored one by one, continuing the block's sum. Both tests
keep a margin (:data:`TOL`, above the worst rounding of a sum of up to a million probabilities, ``K ε``) so that they agree with the reference's
sequential sums; a score that lands within the margin of ``t`` sends the row through the reference computation
(a stable sort and sequential prefix sums), as do rows that the bracket cannot narrow.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np

TOL = 1e-9  # > K * 2.2e-16 for K up to 10^6: sums taken in another order cannot cross t unseen
MIN_SIZE = 1 << 18  # below this many entries numpy is fast enough and no thread pool starts

try:  # an accelerator, never a requirement
    from numba import njit, prange
except ImportError:
    njit = None

_LOCK = threading.Lock()  # numba's default thread pool must not be entered by two Python threads at once


def available() -> bool:
    return njit is not None and os.environ.get("ROADWORK_NUMBA", "1") != "0"


def use_for(p: np.ndarray) -> bool:
    return available() and p.size >= MIN_SIZE


if njit is not None:

    @njit(fastmath=True, cache=True)
    def _stats_at(row: Any, c: float) -> Any:
        """Row sum, negative count (validation) and mass/count at or above ``c``, in one vectorised pass."""
        s = 0.0
        neg = 0
        m = 0.0
        n = 0
        for j in range(row.shape[0]):
            v = row[j]
            s += v
            neg += v < 0.0
            m += v if v >= c else 0.0
            n += v >= c
        return s, neg, m, n

    @njit(fastmath=True, cache=True)
    def _at_least(row: Any, c: float) -> Any:
        s = 0.0
        n = 0
        for j in range(row.shape[0]):
            v = row[j]
            s += v if v >= c else 0.0
            n += v >= c
        return s, n

    @njit(cache=True)
    def _pen(r: float, lam: float, k_reg: int) -> float:
        return lam * max(r - k_reg, 0.0) if lam > 0 else 0.0

    @njit(cache=True)
    def _score(before: float, x: float, r: int, ui: float, lam: float, k_reg: int, rnd: bool) -> float:
        """The reference's arithmetic, in its order: mass before, then ``u v``, then the penalty (rank ``r + 1``)."""
        sc = before
        if rnd:
            sc = sc + ui * x
        if lam > 0:
            sc = sc + lam * max(r + 1.0 - k_reg, 0.0)
        return sc

    @njit(cache=True)
    def _excludes(m: float, n: int, t: float, lam: float, k_reg: int) -> bool:
        """Whether everything below a cut with mass ``m`` and count ``n`` at or above it scores above ``t``."""
        return m + _pen(n + 1, lam, k_reg) > t + TOL

    @njit(cache=True)
    def _bracket(row: Any, c: float, t: float, lam: float, k_reg: int, m: float, n: int) -> Any:
        """``(lo, hi, mass at or above hi, count at or above hi)`` starting from a probe at ``c`` (mass ``m``,
        count ``n``); ``lo = -inf`` when no cut excludes anything."""
        if _excludes(m, n, t, lam, k_reg):  # c already excludes what lies below it: look upwards
            lo, m_lo, n_lo = c, m, n
            hi, m_hi, n_hi = c, m, n
            while True:
                hi = hi * 4.0
                if hi > 1.0:
                    return lo, np.inf, 0.0, 0
                m_hi, n_hi = _at_least(row, hi)
                if not _excludes(m_hi, n_hi, t, lam, k_reg):
                    break
                lo, m_lo, n_lo = hi, m_hi, n_hi
        else:
            hi, m_hi, n_hi = c, m, n
            lo = c
            while True:
                lo = lo * 0.25
                if lo < 1e-300:
                    return -np.inf, hi, m_hi, n_hi
                m_lo, n_lo = _at_least(row, lo)
                if _excludes(m_lo, n_lo, t, lam, k_reg):
                    break
                hi, m_hi, n_hi = lo, m_lo, n_lo
        # narrow until few classes remain between the cuts: regula falsi on log(cut) against the excess score
        # f = mass + next penalty - t (positive at lo, not at hi), kept inside the middle 80 % of the bracket
        while n_lo - n_hi > 8 and hi > lo * 1.05:
            f_lo = m_lo + _pen(n_lo + 1, lam, k_reg) - t
            f_hi = m_hi + _pen(n_hi + 1, lam, k_reg) - t
            w = f_lo / (f_lo - f_hi) if f_lo - f_hi > 0 else 0.5
            w = min(max(w, 0.1), 0.9)
            mid = lo * (hi / lo) ** w
            m, n = _at_least(row, mid)
            if _excludes(m, n, t, lam, k_reg):
                lo, m_lo, n_lo = mid, m, n
            else:
                hi, m_hi, n_hi = mid, m, n
        if m_hi + _pen(n_hi, lam, k_reg) > t - TOL:
            hi, m_hi, n_hi = np.inf, 0.0, 0  # the block is within rounding of t: score all of it one by one
        return lo, hi, m_hi, n_hi

    @njit(cache=True)
    def _exact_row(
        row: Any, i: int, t: float, ui: float, rnd: bool, lam: float, k_reg: int, out: Any
    ) -> None:
        """The reference computation: stable sort by decreasing probability, sequential prefix sums."""
        order = np.argsort(-row, kind="mergesort")
        for j in range(row.shape[0]):
            out[i, j] = False
        before = 0.0
        for r in range(row.shape[0]):
            x = row[order[r]]
            if _score(before, x, r, ui, lam, k_reg, rnd) > t:
                break
            out[i, order[r]] = True
            before += x

    @njit(fastmath=True, cache=True)
    def _mark_at_least(row: Any, c: float, out_row: Any) -> None:
        for j in range(row.shape[0]):
            out_row[j] = row[j] >= c

    @njit(cache=True)
    def _top_m_row(
        row: Any,
        i: int,
        t: float,
        ui: float,
        rnd: bool,
        lam: float,
        k_reg: int,
        c: float,
        m: float,
        n: int,
        out: Any,
        vals: Any,
        idx: Any,
    ) -> float:
        """The set of row ``i`` into ``out[i]``, from a first probe at ``c`` (mass ``m``, count ``n`` at or above it);
        returns the lower cut, the next row's first probe (rows are alike)."""
        k = row.shape[0]
        if t == np.inf:
            out[i, :] = True
            return c
        lo, hi, s_top, n_top = _bracket(row, c, t, lam, k_reg, m, n)
        if lo == -np.inf:
            _exact_row(row, i, t, ui, rnd, lam, k_reg, out)
            return hi if hi < np.inf else c
        _mark_at_least(row, hi, out[i])
        n_z = 0
        bits = row.view(
            np.uint64
        )  # positive doubles order as their bit patterns: one unsigned test per class
        b_lo = np.uint64(np.float64(lo).view(np.uint64)) if lo > 0 else np.uint64(0)
        width = (np.float64(hi).view(np.uint64) if hi < np.inf else np.uint64(0x7FF0000000000000)) - b_lo
        for j in range(k):  # the classes between the cuts, in class order (a stable sort's), without branches
            idx[n_z] = j
            n_z += (bits[j] - b_lo) < width
        for a in range(n_z):
            vals[a] = row[idx[a]]
        if n_z > 32:
            order = np.argsort(-vals[:n_z], kind="mergesort")
            vs = vals[:n_z][order]
            js = idx[:n_z][order]
            vals[:n_z] = vs
            idx[:n_z] = js
        else:  # insertion sort, stable: decreasing probability, ties by class index
            for a in range(1, n_z):
                x = vals[a]
                ja = idx[a]
                b = a - 1
                while b >= 0 and vals[b] < x:
                    vals[b + 1] = vals[b]
                    idx[b + 1] = idx[b]
                    b -= 1
                vals[b + 1] = x
                idx[b + 1] = ja
        before = s_top
        for a in range(n_z):
            x = vals[a]
            sc = _score(before, x, n_top + a, ui, lam, k_reg, rnd)
            if abs(sc - t) <= TOL:  # too close to call with a reordered sum: do what the reference does
                _exact_row(row, i, t, ui, rnd, lam, k_reg, out)
                return lo
            if sc > t:
                break
            out[i, idx[a]] = True
            before += x
        return lo

    @njit(parallel=True, cache=True)
    def _top_m_kernel(p: Any, t: Any, u: Any, lam: float, k_reg: int, out: Any, sums: Any, negs: Any) -> None:
        n, k = p.shape
        rnd = u.shape[0] > 0
        n_chunks = 64
        step = (n + n_chunks - 1) // n_chunks
        for ch in prange(n_chunks):
            vals = np.empty(k + 1)
            idx = np.empty(k + 1, np.int64)
            c = -1.0  # the previous row's lower cut: the first probe of the next row
            for i in range(ch * step, min(n, (ch + 1) * step)):
                row = p[i]
                ti = t[i]
                if not (c > 0.0 and c <= 1.0):
                    c = min(max(ti, 1e-3), 1.0)
                s, neg, m, cnt = _stats_at(row, c)
                sums[i] = s
                negs[i] = neg
                c = _top_m_row(row, i, ti, u[i] if rnd else 0.0, rnd, lam, k_reg, c, m, cnt, out, vals, idx)

    @njit(fastmath=True, cache=True)
    def _lac_row(row: Any, cut: Any, out_row: Any) -> Any:
        """``out_row = row >= cut`` with the row's sum and negative count, in one vectorised pass."""
        s = 0.0
        neg = 0
        for j in range(row.shape[0]):
            v = row[j]
            s += v
            neg += v < 0.0
            out_row[j] = v >= cut[j]
        return s, neg

    @njit(parallel=True, cache=True)
    def _lac_kernel(p: Any, cut_cls: Any, cut_row: Any, out: Any, sums: Any, negs: Any) -> None:
        """``cut_cls`` (K,) for every row, or ``cut_row`` (n,): one cut per row, spread over a row buffer."""
        n, k = p.shape
        per_row = cut_row.shape[0] > 0
        n_chunks = 64
        step = (n + n_chunks - 1) // n_chunks
        for ch in prange(n_chunks):
            cut = np.empty(k) if per_row else cut_cls
            for i in range(ch * step, min(n, (ch + 1) * step)):
                if per_row:
                    cut[:] = cut_row[i]
                s, neg = _lac_row(p[i], cut, out[i])
                sums[i] = s
                negs[i] = neg


def _stats_ok(sums: np.ndarray, negs: np.ndarray) -> bool:
    """The test of ``check_probs``: rows sum to 1 within 1e-6 and nothing is negative (NaN fails the first)."""
    return bool(np.all(np.abs(sums - 1.0) <= 1e-6)) and not negs.any()


def top_m_sets(
    p: np.ndarray, t: np.ndarray, u: np.ndarray | None, lam: float, k_reg: int
) -> tuple[np.ndarray, bool]:
    """APS/RAPS sets for row thresholds ``t`` (shape (n,)) and whether ``p`` passed the probability checks."""
    p = np.ascontiguousarray(p, dtype=np.float64)
    n = len(p)
    out = np.empty(p.shape, dtype=bool)
    sums, negs = np.empty(n), np.empty(n, dtype=np.int64)
    uu = np.empty(0) if u is None else np.ascontiguousarray(u, dtype=np.float64)
    with _LOCK:
        _top_m_kernel(
            p, np.ascontiguousarray(t, dtype=np.float64), uu, float(lam), int(k_reg), out, sums, negs
        )
    return out, _stats_ok(sums, negs)


def lac_sets(p: np.ndarray, cut: np.ndarray) -> tuple[np.ndarray, bool]:
    """``p >= cut`` (``cut`` of shape (1, K) or (n, 1)) and whether ``p`` passed the probability checks."""
    p = np.ascontiguousarray(p, dtype=np.float64)
    n = len(p)
    out = np.empty(p.shape, dtype=bool)
    sums, negs = np.empty(n), np.empty(n, dtype=np.int64)
    per_row = cut.shape[0] != 1 or cut.shape[1] == 1
    cut_cls = np.empty(0) if per_row else np.ascontiguousarray(cut[0], dtype=np.float64)
    cut_row = (
        np.ascontiguousarray(np.broadcast_to(cut, (n, 1))[:, 0], dtype=np.float64) if per_row else np.empty(0)
    )
    with _LOCK:
        _lac_kernel(p, cut_cls, cut_row, out, sums, negs)
    return out, _stats_ok(sums, negs)
