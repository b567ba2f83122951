"""Optional compiled kernels for large conformal predictions (numba; ``pip install 'roadwork[fast]'``).

The numpy implementations in :mod:`roadwork.trust.conformal` are the definition; these kernels compute the same
sets, bit for bit, in one read of the probabilities (the validation sums of ``check_probs`` come out of the same
read). They are used for inputs of at least :data:`MIN_SIZE` entries when numba imports and ``ROADWORK_NUMBA`` is not
``0``; tests run both paths on the same inputs and compare them.

APS/RAPS per row, without sorting the row. The score of the class at rank ``r`` (classes by decreasing
probability, ties by index) is ``before_r [+ u v_r] [+ λ (r - k_reg)^+]`` with ``before_r`` the mass ranked before
it; it never decreases with the rank, so the set is the top ``m`` classes. The boundary is bracketed between two
probability cuts:

- below ``lo`` everything is out: a class there has at least the mass at or above ``lo`` before it and a rank past
  the count at or above ``lo``, so its score exceeds ``t``;
- at or above ``hi`` everything is in: that block's mass plus its last rank's penalty is at most ``t``.

The one read of the row from memory (:func:`_first_read`) sums the mass at or above :data:`CUTS` cuts spaced by
:data:`SPREAD` around the last typical row's cut, and writes a byte per class: how many cuts lie at or below it.
In most rows the boundary falls between two of those cuts, and everything after stays in L1 and touches bytes, not
doubles: the set's block is marked from the codes (64 classes per instruction), the few percent of classes between
the two cuts are gathered without branches (a SWAR byte match, packed to bit words), narrowed by regula falsi over
just those classes, and each remaining one is scored against the others (the mass and rank before it), with no
sort and no unpredictable branch. Rows whose boundary lies outside the cuts (a peaked row, a flat one) search with
whole-row probes first. Every test keeps a margin (:data:`TOL`, above the worst rounding of a sum of up to a million
probabilities, ``K ε``) so that it agrees with the reference's sequential sums; a score that lands within the margin
of ``t`` sends the row through the reference computation (a stable sort and sequential prefix sums).
"""

from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np

from roadwork.trust._hashing import seed_mix, splitmix64

TOL = 1e-9  # > K * 2.2e-16 for K up to 10^6: sums taken in another order cannot cross t unseen
CUTS = 5  # probability cuts in the first read (_first_read is written out for five)
SPREAD = 1.25  # their spacing: on the benchmark's rows ~3/4 of boundaries fall between two, ~10 classes apart
WIDE = 64  # a search by whole-row probes stops with this few classes between its cuts...
NARROW = 8  # ...then probes over just those classes narrow to this few, scored against each other
MIN_SIZE = 1 << 18  # below this many entries numpy is fast enough and no thread pool starts

try:  # an accelerator, never a requirement
    from numba import njit, prange
    from numba.cpython.unsafe.numbers import trailing_zeros
except ImportError:
    njit = None

_LOCK = threading.Lock()  # numba's default thread pool must not be entered by two Python threads at once


def available() -> bool:
    return njit is not None and os.environ.get("ROADWORK_NUMBA", "1") != "0"


def use_for(p: np.ndarray) -> bool:
    return available() and p.size >= MIN_SIZE


# The reads that validate (row sums, NaN/inf) may reassociate the sums (so they vectorise) but must not assume
# finite values: numba's full fastmath includes LLVM's nnan/ninf, under which a NaN test may be folded away.
SAFE_FASTMATH = {"reassoc", "nsz", "arcp", "contract"}

if njit is not None:

    @njit(fastmath=SAFE_FASTMATH, cache=True)
    def _first_read(row: Any, cuts: Any, ms: Any, code: Any) -> Any:
        """The one read of a row from memory: its sum and negative count (validation) and, for each of the
        :data:`CUTS` increasing cuts, the mass at or above it; ``code[j]`` = how many cuts lie at or below ``row[j]``
        (one byte per class, for the passes that follow in cache; counts come from them, see :func:`_code_counts`,
        which is cheaper than counting here); and the wrapping sum of the bit patterns, the hash that
        :func:`~roadwork.trust.conformal.row_uniforms` mixes into the row's ``u``."""
        c0, c1, c2, c3, c4 = cuts[0], cuts[1], cuts[2], cuts[3], cuts[4]
        bits = row.view(np.uint64)
        s = 0.0
        neg = 0
        h = np.uint64(0)
        m0 = 0.0  # one statement per accumulator: numba vectorises this loop only when written out like this
        m1 = 0.0
        m2 = 0.0
        m3 = 0.0
        m4 = 0.0
        for j in range(row.shape[0]):
            v = row[j]
            s += v
            neg += v < 0.0
            h += bits[j]
            m0 += v if v >= c0 else 0.0
            m1 += v if v >= c1 else 0.0
            m2 += v if v >= c2 else 0.0
            m3 += v if v >= c3 else 0.0
            m4 += v if v >= c4 else 0.0
            code[j] = (v >= c0) + (v >= c1) + (v >= c2) + (v >= c3) + (v >= c4)
        ms[0] = m0
        ms[1] = m1
        ms[2] = m2
        ms[3] = m3
        ms[4] = m4
        return s, neg, h

    _splitmix64 = njit(cache=True)(splitmix64)  # row_uniforms' mixer, compiled for one uint64

    @njit(fastmath=True, cache=True)
    def _code_counts(code: Any, k: int, ns: Any) -> None:
        """``ns[q]`` = how many classes lie at or above cut ``q`` (code above ``q``), 64 codes per instruction."""
        n0 = 0
        n1 = 0
        n2 = 0
        n3 = 0
        n4 = 0
        for j in range(k):
            c = code[j]
            n0 += c > 0
            n1 += c > 1
            n2 += c > 2
            n3 += c > 3
            n4 += c > 4
        ns[0] = n0
        ns[1] = n1
        ns[2] = n2
        ns[3] = n3
        ns[4] = n4

    @njit(fastmath=True, cache=True)
    def _at_least(row: Any, c: float) -> Any:
        s = 0.0
        n = 0
        for j in range(row.shape[0]):
            v = row[j]
            s += v if v >= c else 0.0
            n += v >= c
        return s, n

    @njit(fastmath=True, cache=True)
    def _mark_codes(code: Any, at: int, o: Any) -> None:
        """In: the classes whose code is above ``at`` (at or above the cut above the boundary), 64 per instruction."""
        c = np.uint8(at)
        for j in range(o.shape[0]):
            o[j] = code[j] > c

    @njit(fastmath=True, cache=True)
    def _split_bits(row: Any, lo: float, hi: float, o: Any, code: Any) -> None:
        """In (at or above ``hi``) and code 1 for the classes from ``lo`` to below ``hi`` (2 above, 0 below), from the
        probabilities' bit patterns, which order like positive doubles: one unsigned test per class."""
        bits = row.view(np.uint64)
        b_lo = np.float64(lo).view(np.uint64) if lo > 0 else np.uint64(0)
        b_hi = np.float64(hi).view(np.uint64) if hi < np.inf else np.uint64(0x7FF0000000000000)
        width = b_hi - b_lo
        for j in range(row.shape[0]):
            above = bits[j] >= b_hi
            o[j] = above
            code[j] = ((bits[j] - b_lo) < width) + 2 * above

    @njit(cache=True)
    def _gather(row: Any, code: Any, at: int, packed: Any, words: Any, idx: Any, vals: Any) -> int:
        """The classes whose code is ``at`` (``code`` zero past the row), in class order, into ``idx`` and ``vals``;
        returns how many. Eight codes at a time: the bytes equal to ``at`` are found without branches (XOR, then the
        exact zero-byte test), packed to bits by a multiply, the non-empty 64-bit words listed, and their bits
        taken without branches (candidates are a few percent of the classes, scattered: branches would mispredict)."""
        cw = code.view(np.uint64)
        lo7 = np.uint64(0x7F7F7F7F7F7F7F7F)
        rep = np.uint64(at) * np.uint64(0x0101010101010101)
        for w in range(cw.shape[0]):
            y = cw[w] ^ rep
            z = ~(((y & lo7) + lo7) | y | lo7) >> np.uint64(7)  # 1 in each byte of y that is zero, else 0
            packed[w] = (z * np.uint64(0x0102040810204080)) >> np.uint64(56)
        pw = packed.view(np.uint64)
        n_w = 0
        for w in range(pw.shape[0]):
            words[n_w] = w
            n_w += pw[w] != 0
        top = np.uint64(1) << np.uint64(63)  # keeps trailing_zeros off zero (its result is not counted then)
        n = 0
        for a in range(n_w):  # words are independent: two flags each without a branch, a third one is rare
            w = words[a]
            x = pw[w]
            base = 64 * w
            idx[n] = base + trailing_zeros(x)
            n += 1
            x &= x - np.uint64(1)
            idx[n] = base + trailing_zeros(x | top)
            n += x != 0
            x &= x - np.uint64(1)
            while x != 0:
                idx[n] = base + trailing_zeros(x)
                n += 1
                x &= x - np.uint64(1)
        for c in range(n):
            vals[c] = row[idx[c]]
        return n

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
    def _narrow(
        vals: Any, t: float, lam: float, k_reg: int, base: Any, lo: float, hi: float, lohi: Any, limit: int
    ) -> Any:
        """Regula falsi on log(cut) against the excess score f = mass + next penalty - t (positive at ``lo``, not at
        ``hi``), kept inside the middle 80 % of the bracket, until at most ``limit`` classes lie between the cuts.
        A probe sums ``vals`` (the whole row, or the candidates) and adds ``base`` (mass, count above them);
        ``lohi`` holds (mass, count) at ``lo`` then at ``hi`` and is updated in place."""
        m_b, n_b = base
        m_lo, n_lo, m_hi, n_hi = lohi
        while n_lo - n_hi > limit and hi > lo * 1.05:
            f_lo = m_lo + _pen(n_lo + 1, lam, k_reg) - t
            f_hi = m_hi + _pen(n_hi + 1, lam, k_reg) - t
            w = f_lo / (f_lo - f_hi) if f_lo - f_hi > 0 else 0.5
            w = min(max(w, 0.1), 0.9)
            mid = lo * (hi / lo) ** w
            m, n = _at_least(vals, mid)
            m += m_b
            n += n_b
            if _excludes(m, n, t, lam, k_reg):
                lo, m_lo, n_lo = mid, m, n
            else:
                hi, m_hi, n_hi = mid, m, n
        return lo, hi, m_lo, n_lo, m_hi, n_hi

    @njit(cache=True)
    def _search(
        row: Any, t: float, lam: float, k_reg: int, lo: float, m_lo: float, n_lo: int, up: bool
    ) -> Any:
        """A bracket when the first read's cuts all exclude (``up``: search up from ``lo``, by factors of 4) or none
        does (search down from the given cut, held in ``lo``); ``(lo, hi, m_lo, n_lo, m_hi, n_hi)`` with ``lo =
        -inf`` when no cut excludes anything and ``hi = inf`` when the top class alone is past ``1/4``."""
        if up:
            while True:
                hi = lo * 4.0
                if hi > 1.0:
                    return lo, np.inf, m_lo, n_lo, 0.0, 0
                m_hi, n_hi = _at_least(row, hi)
                if not _excludes(m_hi, n_hi, t, lam, k_reg):
                    break
                lo, m_lo, n_lo = hi, m_hi, n_hi
        else:
            hi, m_hi, n_hi = lo, m_lo, n_lo
            while True:
                lo = hi * 0.25
                if lo < 1e-300:
                    return -np.inf, hi, 0.0, 0, m_hi, n_hi
                m_lo, n_lo = _at_least(row, lo)
                if _excludes(m_lo, n_lo, t, lam, k_reg):
                    break
                hi, m_hi, n_hi = lo, m_lo, n_lo
        return _narrow(row, t, lam, k_reg, (0.0, 0), lo, hi, (m_lo, n_lo, m_hi, n_hi), WIDE)

    @njit(fastmath=True, cache=True)
    def _mass_before(vals: Any, n_b: int, q: int) -> Any:
        """Mass and count of the classes ranked before class ``q`` among ``vals[:n_b]`` (held in class order): larger
        probability, or equal and earlier."""
        v = vals[q]
        m = 0.0
        r = 0
        for a in range(n_b):
            x = vals[a]
            before = (x > v) | ((x == v) & (a < q))
            m += x if before else 0.0
            r += before
        return m, r

    @njit(cache=True)
    def _score_in_order(
        vals: Any,
        idx: Any,
        n: int,
        m_hi: float,
        n_hi: int,
        t: float,
        ui: float,
        rnd: bool,
        lam: float,
        k_reg: int,
        o: Any,
        tol: float,
    ) -> bool:
        """The reference's arithmetic on ``vals[:n]`` (classes ``idx``), continuing a block of mass ``m_hi`` and
        ``n_hi`` classes above them: a stable sort by decreasing probability and a running sum, marking classes until
        one scores above ``t``. Returns whether a score lies within ``tol`` of ``t`` (where a sum taken in another
        order than the reference's cannot decide) and stops there; ``tol < 0`` decides every score."""
        order = np.argsort(-vals[:n], kind="mergesort")
        before = m_hi
        for q in range(n):
            x = vals[order[q]]
            sc = _score(before, x, n_hi + q, ui, lam, k_reg, rnd)
            if abs(sc - t) <= tol:
                return True
            if sc > t:
                break
            o[idx[order[q]]] = 1
            before += x
        return False

    @njit(cache=True)
    def _exact_row(row: Any, t: float, ui: float, rnd: bool, lam: float, k_reg: int, o: Any) -> None:
        """The reference computation on the whole row: stable sort, sequential prefix sums."""
        o[:] = 0
        _score_in_order(row, np.arange(row.shape[0]), row.shape[0], 0.0, 0, t, ui, rnd, lam, k_reg, o, -1.0)

    @njit(cache=True)
    def _score_between(
        vals: Any,
        idx: Any,
        n_b: int,
        m_hi: float,
        n_hi: int,
        t: float,
        ui: float,
        rnd: bool,
        lam: float,
        k_reg: int,
        o: Any,
    ) -> bool:
        """Mark the classes between the cuts that score at most ``t``, continuing the block above. Each of a few
        (at most 32) is scored on its own, from the mass and rank before it among the others: no sort and no
        unpredictable branch; scores never decrease with the rank, so these are the reference's top ones. More (ties,
        or a dense stretch the bracket could not split) are sorted. Returns whether a score lies within
        :data:`TOL` of ``t``, where a reordered sum cannot decide."""
        if n_b > 32:
            return _score_in_order(vals, idx, n_b, m_hi, n_hi, t, ui, rnd, lam, k_reg, o, TOL)
        close = False
        for q in range(n_b):
            m, r = _mass_before(vals, n_b, q)
            sc = _score(m_hi + m, vals[q], n_hi + r, ui, lam, k_reg, rnd)
            close |= abs(sc - t) <= TOL
            o[idx[q]] |= sc <= t
        return close

    @njit(cache=True)
    def _top_m_row(
        row: Any,
        t: float,
        ui: float,
        rnd: bool,
        lam: float,
        k_reg: int,
        cuts: Any,
        ms: Any,
        ns: Any,
        o: Any,
        w: Any,
    ) -> Any:
        """The set of one row into ``o`` (bytes), after the first read; returns the row's lower cut (a guess for the
        next row's) and whether it lay among the first read's cuts. ``w`` holds the work buffers."""
        code, packed, words, idx, vals = w
        if t == np.inf:
            o[:] = 1
            return cuts[CUTS // 2], True
        if lam > 0:  # the penalty needs the ranks; APS (no penalty) needs no count for the usual row
            _code_counts(code, row.shape[0], ns)
        else:
            ns[:] = 0
        a = -1  # the highest cut that excludes what lies below it
        for q in range(CUTS):
            if _excludes(ms[q], ns[q], t, lam, k_reg):
                a = q
        inside = 0 <= a < CUTS - 1
        if inside:  # the usual case: the boundary lies between two of the first read's cuts
            lo, hi = cuts[a], cuts[a + 1]
            m_lo, n_lo, m_hi, n_hi = ms[a], ns[a], ms[a + 1], ns[a + 1]
            at = a + 1
            _mark_codes(code, at, o)
        else:
            if lam == 0:
                _code_counts(code, row.shape[0], ns)
            lo, hi, m_lo, n_lo, m_hi, n_hi = _search(
                row, t, lam, k_reg, cuts[a] if a >= 0 else cuts[0], ms[max(a, 0)], ns[max(a, 0)], a >= 0
            )
            if lo == -np.inf:
                _exact_row(row, t, ui, rnd, lam, k_reg, o)
                return hi, False
            at = 1
            _split_bits(row, lo, hi, o, code)
        # the classes between the cuts: a few percent of the row
        n_z = _gather(row, code, at, packed, words, idx, vals)
        n_lo = n_hi + n_z  # (the counts are zero when nothing needs them)
        if hi < np.inf:
            lo, hi, m_lo, n_lo, m_hi, n_hi = _narrow(
                vals[:n_z], t, lam, k_reg, (m_hi, n_hi), lo, hi, (m_lo, n_lo, m_hi, n_hi), NARROW
            )
            if m_hi + _pen(n_hi, lam, k_reg) > t - TOL:  # the block at or above hi is within rounding of t
                _exact_row(row, t, ui, rnd, lam, k_reg, o)
                return lo, inside
        n_b = 0
        for q in range(n_z):  # branch-free: in if at or above hi, kept if between the cuts (coin flips both)
            x = vals[q]
            j = idx[q]
            o[j] |= x >= hi
            vals[n_b] = x
            idx[n_b] = j
            n_b += (x >= lo) & (x < hi)
        if _score_between(
            vals, idx, n_b, m_hi, n_hi, t, ui, rnd, lam, k_reg, o
        ):  # too close to call: as the reference
            _exact_row(row, t, ui, rnd, lam, k_reg, o)
        return lo, inside

    @njit(parallel=True, cache=True)
    def _top_m_kernel(
        p: Any, t: Any, u: Any, hashed: bool, mix: Any, lam: float, k_reg: int, out: Any, sums: Any, negs: Any
    ) -> None:
        """``u`` given (shape (n,)), or ``hashed``: each row's from its hash, as ``row_uniforms`` with the seed's
        mix ``mix``; neither: deterministic."""
        n, k = p.shape
        given = u.shape[0] > 0
        rnd = given or hashed
        n_chunks = 64
        step = (n + n_chunks - 1) // n_chunks
        ob = out.view(np.uint8)
        k64 = (k + 63) // 64
        for ch in prange(n_chunks):
            w = (
                np.zeros(k64 * 64, np.uint8),  # code: zero past the row
                np.empty(k64 * 8, np.uint8),  # packed
                np.empty(k64, np.int64),  # words
                np.empty(k + 1, np.int64),  # idx
                np.empty(k + 1),  # vals
            )
            cuts = np.empty(CUTS)
            ms = np.empty(CUTS)
            ns = np.empty(CUTS, np.int64)
            c = -1.0  # the middle of the next row's first cuts: the last typical row's lower cut
            missed = False
            for i in range(ch * step, min(n, (ch + 1) * step)):
                row = p[i]
                ti = t[i]
                if not (c > 0.0 and c <= 1.0):
                    c = min(max(ti, 1e-3), 1.0)
                for q in range(CUTS):
                    cuts[q] = c * SPREAD ** (q - CUTS // 2)
                s, neg, h = _first_read(row, cuts, ms, w[0])
                sums[i] = s
                negs[i] = neg
                ui = 0.0
                if given:
                    ui = u[i]
                elif hashed:
                    ui = np.float64(_splitmix64(h ^ mix) >> np.uint64(11)) * 2.0**-53
                lo, inside = _top_m_row(row, ti, ui, rnd, lam, k_reg, cuts, ms, ns, ob[i], w)
                if inside or missed:  # one atypical row (a peaked one, say) does not move the guess; two do
                    c = lo
                missed = not inside

    @njit(fastmath=SAFE_FASTMATH, cache=True)
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
    p: np.ndarray, t: np.ndarray, u: np.ndarray | None, lam: float, k_reg: int, seed: int | None = None
) -> tuple[np.ndarray, bool]:
    """APS/RAPS sets for row thresholds ``t`` (shape (n,)) and whether ``p`` passed the probability checks.

    Randomised with ``u`` (shape (n,)), or with ``seed``: ``u = row_uniforms(p, seed)``, hashed in the same read."""
    p = np.ascontiguousarray(p, dtype=np.float64)
    n = len(p)
    out = np.empty(p.shape, dtype=bool)
    sums, negs = np.empty(n), np.empty(n, dtype=np.int64)
    uu = np.empty(0) if u is None else np.ascontiguousarray(u, dtype=np.float64)
    hashed = u is None and seed is not None
    mix = seed_mix(seed) if seed is not None else np.uint64(0)
    with _LOCK:
        _top_m_kernel(
            p,
            np.ascontiguousarray(t, dtype=np.float64),
            uu,
            hashed,
            mix,
            float(lam),
            int(k_reg),
            out,
            sums,
            negs,
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
