"""Split-conformal prediction sets (numpy only, vectorised, float64).

Scores of an image ``x`` for a candidate class ``k`` (``p`` calibrated probabilities, ``r_k`` the 1-based rank
of ``k`` when classes are sorted by decreasing ``p`` (ties by class index), ``m_k`` the probability mass ranked
strictly before ``k``, ``u ~ U(0, 1)`` one draw per image, a seeded hash of its probabilities — see :func:`row_uniforms`):

- ``lac`` (Sadinle et al., 2019):          ``s = 1 - p_k``
- ``aps`` (Romano et al., 2020):           ``s = m_k + u p_k``
- ``raps`` (Angelopoulos et al., 2021):    the APS score ``+ λ (r_k - k_reg)^+``

With ``n`` calibration scores of the true class the threshold ``q`` is the ⌈(n+1)(1-α)⌉-th smallest score
(+∞, with a warning, when that exceeds ``n``). APS/RAPS are always *calibrated* on the randomised score, the one
whose quantile is exact. ``randomized=True`` predicts ``{k : s(x, k) <= q}`` with a fresh ``u`` per image
(coverage in ``[1-α, 1-α + 1/(n+1))`` in expectation); ``randomized=False`` (default) predicts the
deterministic superset ``{k : m_k + λ (r_k - k_reg)^+ <= q}`` — the set at ``u = 0``, which contains the
randomised set for every ``u``, so coverage stays ≥ 1-α and the same image always gets the same set. This is
MAPIE's ``include_last_label=True`` for APS; for RAPS MAPIE tests ``m_k + λ (r_k - 1 - k_reg)^+``, a slightly
larger superset. The score is non-decreasing in the rank, so every APS/RAPS set is the top ``m`` classes of
its image: prediction finds ``m`` from the ``top-k`` probabilities (``np.partition``; ``k`` grows only for the
rows that need more) instead of sorting all ``K`` classes, and fitting needs no sort at all. For large inputs
(``n K >= 2^18``) with numba installed, :mod:`roadwork.trust._kernels` computes the same sets (and the input
checks) in one read of the probabilities; ``ROADWORK_NUMBA=0`` turns it off.

Mondrian (``mondrian="class"``) fits one threshold per true class and tests each candidate class against
its own threshold: coverage ≥ 1-α holds *within every class*. ``mondrian="group"`` fits one threshold per
value of a group known at prediction time (a slice column such as weather): coverage ≥ 1-α holds within
every group seen in calibration; rows of an unseen group get the global threshold (marginal guarantee only). ``allow_empty=False`` adds the top class to
an empty set (coverage can only rise). RAPS without explicit ``k_reg``/``lam`` tunes them on a held-out
``tune_fraction`` of the calibration rows as in Angelopoulos et al. (k_reg: the (1-α) quantile of the true
class's rank; λ: the grid value with the smallest mean set size), and uses the rest for the threshold.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

import numpy as np

from roadwork.errors import ArtifactError, InputError, NotFittedError, RoadworkWarning, bad_value
from roadwork.jsonio import threshold_from_json, threshold_to_json
from roadwork.trust._checks import check_labels, check_level, check_probs
from roadwork.trust._hashing import seed_mix, splitmix64

__all__ = ["SplitConformal", "class_scores", "conformal_quantile", "robust_quantile", "row_uniforms"]

Score = Literal["lac", "aps", "raps"]
_LAMBDAS = (0.0, 0.001, 0.01, 0.05, 0.1, 0.2, 0.5)


def conformal_quantile(scores: np.ndarray, alpha: float) -> float:
    """The ⌈(n+1)(1-α)⌉-th smallest of ``scores`` (+∞ with a warning when that exceeds n)."""
    alpha = check_level(alpha, "alpha", "conformal_quantile")
    s = np.asarray(scores, dtype=np.float64).ravel()
    if np.isnan(s).any():
        raise InputError(
            f"The 'scores' parameter of conformal_quantile contains NaN in {int(np.isnan(s).sum())} place(s); "
            "a conformal threshold needs a score for every calibration row. Remove those rows."
        )
    n = s.size
    k = math.ceil((n + 1) * (1 - alpha) - 1e-12)  # epsilon: (n+1)(1-α) computed a hair above an integer
    if k > n:
        need = math.ceil(1 / alpha - 1)
        warnings.warn(
            f"{n} calibration points are too few for alpha={alpha}: at least {need} are needed for a finite "
            "threshold, so every prediction set is the full label set.",
            RoadworkWarning,
            stacklevel=2,
        )
        return math.inf
    return float(np.partition(s, k - 1)[k - 1])


def robust_quantile(scores: np.ndarray, all_scores: np.ndarray, alpha: float, label_noise: float) -> float:
    """Threshold from calibration labels of which a known fraction is noise (Clarkson et al., 2024, CRCP).

    Noise model: each calibration label was, with probability ``ε = label_noise``, replaced by a class drawn
    uniformly from all ``K`` classes, independently of the image (a flip to one of the *other* classes at rate
    ``f`` is ``ε = f K / (K - 1)``); test labels are clean. The observed true-class score CDF is then
    ``F̃ = (1 - ε) F + ε F_U`` with ``F_U(t) = P(s(X, U) <= t)``, ``U`` uniform — estimated without labels from
    the scores of *every* class of the calibration images (``all_scores``, shape (n, K)). The clean CDF estimate
    is ``F̂ = (F̃_n - ε F_U,n) / (1 - ε)`` and the threshold is the smallest calibration score ``t`` with
    ``F̂(t) >= (1 - α)(n + 1) / n`` — at ``ε = 0`` exactly :func:`conformal_quantile`. The guarantee is
    asymptotic: coverage of clean test labels tends to ``1 - α`` with an error of order ``1 / ((1 - ε) √n)``
    (the two empirical CDFs), not the exact finite-sample bound of the clean case. Plain conformal with noisy
    labels over-covers (wider sets) when the noise is uniform, which is what this removes.
    """
    s = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    n = s.size
    if not 0 <= label_noise < 1:
        raise InputError(f"label_noise must be in [0, 1); got {label_noise!r}.")
    if label_noise == 0 or n == 0:
        return conformal_quantile(s, alpha)
    ref = np.sort(np.asarray(all_scores, dtype=np.float64).ravel())
    f_obs = np.searchsorted(s, s, side="right") / n
    f_rand = np.searchsorted(ref, s, side="right") / ref.size
    f_clean = (f_obs - label_noise * f_rand) / (1 - label_noise)
    hit = np.flatnonzero(f_clean >= (1 - alpha) * (n + 1) / n - 1e-12)
    if hit.size == 0:
        warnings.warn(
            f"{n} calibration points with label_noise={label_noise} are too few for alpha={alpha}: every "
            "prediction set is the full label set.",
            RoadworkWarning,
            stacklevel=2,
        )
        return math.inf
    return float(s[hit[0]])


def row_uniforms(probs: np.ndarray, seed: int = 0) -> np.ndarray:
    """One U(0, 1) draw per row, a seeded hash of the row's probabilities (shape (n_samples,)).

    The same image always gets the same ``u``, and permuting rows or classes changes nothing. Because ``u`` is a
    fixed function of the row, a score built from it is still a fixed function of ``(x, y)``: exchangeable
    calibration and test rows give exchangeable scores, which is all the conformal guarantee needs; the mixer
    makes distinct rows' draws look independent, which is what breaks ties for the exact upper bound.
    """
    bits = np.ascontiguousarray(probs, dtype=np.float64).view(np.uint64)
    with np.errstate(over="ignore"):
        h = bits.sum(axis=1, dtype=np.uint64)  # order-free: invariant to relabelling classes
        h = splitmix64(h ^ seed_mix(seed))
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _penalty(k: int, lam: float, k_reg: int) -> np.ndarray:
    """RAPS penalty ``λ (r - k_reg)^+`` for ranks r = 1..k."""
    return lam * np.maximum(np.arange(1, k + 1, dtype=np.float64) - k_reg, 0.0)


def _sorted_scores(v: np.ndarray, u: np.ndarray | None, lam: float, k_reg: int) -> np.ndarray:
    """APS/RAPS scores of probabilities ``v`` already sorted in decreasing order along axis 1."""
    s = np.cumsum(v, axis=1)
    s[:, 1:] = s[:, :-1]  # mass strictly before each rank (exactly non-decreasing, unlike cumsum - v)
    s[:, 0] = 0.0
    if u is not None:
        s += u[:, None] * v
    if lam > 0:
        s += _penalty(v.shape[1], lam, k_reg)[None, :]
    return s


def class_scores(
    probs: np.ndarray,
    score: Score,
    *,
    u: np.ndarray | None = None,
    lam: float = 0.0,
    k_reg: int = 0,
) -> np.ndarray:
    """Scores of every candidate class, shape (n_samples, n_classes); ``u`` (shape (n_samples,)) randomises
    APS/RAPS, ``u=None`` gives the deterministic score (``u = 0``)."""
    if score == "lac":
        return 1.0 - probs
    order = np.argsort(-probs, axis=1, kind="stable")  # (n, K) classes by decreasing probability
    s_sorted = _sorted_scores(np.take_along_axis(probs, order, axis=1), u, lam, k_reg)
    out = np.empty_like(s_sorted)
    np.put_along_axis(out, order, s_sorted, axis=1)  # back to class order
    return out


def _true_class_scores(p: np.ndarray, y: np.ndarray, u: np.ndarray, lam: float, k_reg: int) -> np.ndarray:
    """APS/RAPS score of the true class in one pass over ``p``, without sorting."""
    n, k = p.shape
    p_true = p[np.arange(n), y][:, None]
    before = (p > p_true) | ((p == p_true) & (np.arange(k)[None, :] < y[:, None]))
    s = np.where(before, p, 0.0).sum(axis=1) + u * p_true[:, 0]
    if lam > 0:
        s += lam * np.maximum(before.sum(axis=1) + 1.0 - k_reg, 0.0)
    return s


def _top_m_sets(
    p: np.ndarray, t: np.ndarray, u: np.ndarray | None, lam: float, k_reg: int, start: int | None = None
) -> np.ndarray:
    """Membership of the sets ``{k : score(x, k) <= t}`` when the score is non-decreasing in the rank.

    Each set is the top ``m`` classes of its row, ``m`` the length of the leading run of ranks whose score is
    ``<= t``. Only the top ``k`` probabilities are sorted (``k`` starts from the longest run among 256 probe rows and
    grows eightfold for the rows whose run reaches ``k``); the set is then ``p >= v_m``, with ties at ``v_m`` resolved by class index as the stable sort does.
    """
    n, n_cls = p.shape
    t = np.broadcast_to(t, (n, 1))
    m = np.zeros(n, dtype=np.int64)
    cut = np.full(n, np.inf)
    todo = np.arange(n)
    if start is None:  # size the first top-k from a sample of rows so that almost every row ends in one round
        probe = np.linspace(0, n - 1, min(n, 256)).astype(np.int64)
        v = np.sort(p[probe], axis=1)[:, ::-1]
        ok = _sorted_scores(v, None if u is None else u[probe], lam, k_reg) <= t[probe]
        longest = int(np.where(ok.all(axis=1), n_cls, np.argmin(ok, axis=1)).max()) if n else 0
        start = 1 << max(4, int(1.25 * longest + 1).bit_length())
    k = min(start, n_cls)
    while todo.size:
        pt = p[todo]
        v = np.sort(np.partition(pt, n_cls - k, axis=1)[:, n_cls - k :] if k < n_cls else pt, axis=1)[:, ::-1]
        ok = _sorted_scores(v, None if u is None else u[todo], lam, k_reg) <= t[todo]
        run = np.where(ok.all(axis=1), k, np.argmin(ok, axis=1))
        done = (run < k) | (k == n_cls)
        rows = todo[done]
        m[rows] = run[done]
        has = run[done] > 0
        cut[rows[has]] = v[done][has, run[done][has] - 1]
        todo = todo[~done]
        k = min(k * 8, n_cls)
    sets = p >= cut[:, None]
    tied = np.flatnonzero(
        sets.sum(axis=1) != m
    )  # equal probabilities straddle the cut: first m in stable order
    if tied.size:
        order = np.argsort(-p[tied], axis=1, kind="stable")
        fix = np.zeros((tied.size, n_cls), dtype=bool)
        np.put_along_axis(fix, order, np.arange(n_cls)[None, :] < m[tied, None], axis=1)
        sets[tied] = fix
    return sets


def _true_rank(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """1-based rank of the true class (ties broken as the stable sort does)."""
    order = np.argsort(-probs, axis=1, kind="stable")
    return np.argmax(order == labels[:, None], axis=1) + 1


class SplitConformal:
    """Split-conformal sets. Learned state: ``threshold_`` (or ``thresholds_`` per class), ``n_``."""

    def __init__(
        self,
        *,
        alpha: float = 0.1,
        score: Score = "lac",
        randomized: bool = False,
        mondrian: Literal["class", "group"] | None = None,
        allow_empty: bool = True,
        k_reg: int | None = None,
        lam: float | None = None,
        tune_fraction: float = 0.2,
        label_noise: float = 0.0,
        group_by: str | None = None,
        seed: int = 0,
    ) -> None:
        self.alpha = alpha
        self.score = score
        self.randomized = randomized
        self.mondrian = mondrian
        self.allow_empty = allow_empty
        self.k_reg = k_reg
        self.lam = lam
        self.tune_fraction = tune_fraction
        self.label_noise = label_noise
        self.group_by = (
            group_by  # the slice column that holds the groups (for TrustPolicy); informational here
        )
        self.seed = seed

    @property
    def method(self) -> str:
        return self.score

    def _check_params(self, where: str) -> float:
        alpha = check_level(self.alpha, "alpha", where)
        if self.score not in ("lac", "aps", "raps"):
            raise InputError(
                f"The 'score' parameter of {where} must be 'lac', 'aps' or 'raps'. Got {self.score!r}."
            )
        if self.mondrian not in (None, "class", "group"):
            raise InputError(
                f"The 'mondrian' parameter of {where} must be None, 'class' or 'group'. Got {self.mondrian!r}."
            )
        if not isinstance(self.label_noise, (int, float)) or not 0 <= self.label_noise < 1:
            raise InputError(
                f"The 'label_noise' parameter of {where} must be a rate in [0, 1). Got {self.label_noise!r}."
            )
        if self.score == "raps":
            tf = self.tune_fraction
            if isinstance(tf, bool) or not isinstance(tf, int | float) or not 0 < tf < 1:
                raise bad_value(
                    "tune_fraction",
                    where,
                    "a float in (0, 1): the share of rows that tune RAPS' k_reg/lam",
                    tf,
                )
            if self.lam is not None and (not isinstance(self.lam, int | float) or not self.lam >= 0):
                raise bad_value("lam", where, "a float >= 0 (or None to tune it)", self.lam)
            if self.k_reg is not None and (
                isinstance(self.k_reg, bool) or not isinstance(self.k_reg, int | np.integer) or self.k_reg < 0
            ):
                raise bad_value("k_reg", where, "an integer >= 0 (or None to tune it)", self.k_reg)
        if self.label_noise and self.mondrian == "class":
            raise InputError(
                f"{where}: label_noise with mondrian='class' is not supported (noise moves rows between "
                "classes); use mondrian=None or 'group'."
            )
        return alpha

    def _u(self, p: np.ndarray) -> np.ndarray:
        return row_uniforms(p, self.seed)

    def _tune_raps(self, p: np.ndarray, y: np.ndarray, alpha: float) -> np.ndarray:
        """Choose k_reg and λ on a held-out part (Angelopoulos et al., 2021, "RAPS: size" tuning)."""
        n_tune = round(self.tune_fraction * len(p))
        if (self.k_reg is not None and self.lam is not None) or n_tune < 10:
            self.k_reg_ = int(self.k_reg if self.k_reg is not None else 1)
            self.lam_ = float(self.lam if self.lam is not None else 0.0)
            return np.arange(len(p))
        idx = np.random.default_rng([self.seed, 7]).permutation(len(p))
        tune, rest = idx[:n_tune], idx[n_tune:]
        pt, yt = p[tune], y[tune]
        if self.k_reg is None:
            ranks = np.sort(_true_rank(pt, yt))
            self.k_reg_ = int(ranks[min(len(ranks) - 1, math.ceil((1 - alpha) * (len(ranks) + 1)) - 1)])
        else:
            self.k_reg_ = int(self.k_reg)
        if self.lam is None:
            best = (math.inf, 0.0)
            half = len(pt) // 2
            u_tune = self._u(pt[:half])
            for lam in _LAMBDAS:  # threshold on one half of the tuning rows, set size on the other
                s_cal = _true_class_scores(pt[:half], yt[:half], u_tune, lam, self.k_reg_)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RoadworkWarning)
                    q = conformal_quantile(s_cal, alpha)
                size = _top_m_sets(pt[half:], np.array([[q]]), None, lam, self.k_reg_).sum(axis=1).mean()
                best = min(best, (float(size), lam))
            self.lam_ = best[1]
        else:
            self.lam_ = float(self.lam)
        return rest

    def _groups(self, groups: object, n: int, where: str) -> np.ndarray:
        if groups is None:
            raise InputError(
                f"{where}: mondrian='group' needs 'groups', one group value per row (e.g. the "
                "'weather' slice column)."
            )
        g = np.asarray(groups).astype(str)
        if g.shape != (n,):
            raise InputError(f"{where}: 'groups' has shape {g.shape}; expected ({n},), one value per row.")
        return g

    def fit(self, probs: object, labels: object, groups: object = None) -> SplitConformal:
        """``groups`` (one value per row) is needed with ``mondrian='group'`` and ignored otherwise."""
        alpha = self._check_params("SplitConformal.fit")
        p = check_probs(probs, "SplitConformal.fit")
        y = check_labels(labels, len(p), p.shape[1], "SplitConformal.fit")
        g = self._groups(groups, len(p), "SplitConformal.fit") if self.mondrian == "group" else None
        self.k_reg_, self.lam_ = 0, 0.0
        self.group_thresholds_: dict[str, float] = {}
        if self.score == "raps":
            keep = self._tune_raps(p, y, alpha)
            p, y, g = p[keep], y[keep], None if g is None else g[keep]
        u = None
        if self.score == "lac":
            s_true = 1.0 - p[np.arange(len(p)), y]
        else:
            u = self._u(p)
            s_true = _true_class_scores(p, y, u, self.lam_, self.k_reg_)
        s_all = (
            class_scores(p, self.score, u=u, lam=self.lam_, k_reg=self.k_reg_) if self.label_noise else s_true
        )

        def quantile(rows: np.ndarray) -> float:
            return robust_quantile(s_true[rows], s_all[rows], alpha, float(self.label_noise))

        self.n_ = len(p)
        self.n_classes_ = p.shape[1]
        if self.mondrian == "class":
            self.thresholds_ = np.array([quantile(y == c) for c in range(p.shape[1])])
            self.threshold_ = float(self.thresholds_.max())
        else:
            self.threshold_ = quantile(np.ones(len(p), dtype=bool))
            self.thresholds_ = np.full(p.shape[1], self.threshold_)
        if (
            g is not None
        ):  # one threshold per group; unseen groups at predict time fall back to the global one
            self.group_thresholds_ = {str(v): quantile(g == v) for v in np.unique(g)}
        return self

    def _row_thresholds(self, groups: object, n: int) -> np.ndarray:
        """(1, K) thresholds, or (n, 1) per-row group thresholds with mondrian='group'."""
        if self.mondrian != "group":
            return self.thresholds_[None, :]
        g = self._groups(groups, n, "SplitConformal.predict_sets")
        values, inverse = np.unique(g, return_inverse=True)
        per_value = np.array([self.group_thresholds_.get(str(v), self.threshold_) for v in values])
        return per_value[inverse][:, None]

    def predict_sets(self, probs: object, groups: object = None) -> np.ndarray:
        """Boolean membership of shape (n_samples, n_classes); ``groups`` as in :meth:`fit`."""
        if not hasattr(self, "thresholds_"):
            raise NotFittedError(self)
        # imported here, not with the module: numba takes ~0.3 s to load and `roadwork help` needs none of it
        from roadwork.trust import _kernels

        where = "SplitConformal.predict_sets"
        p = np.asarray(probs, dtype=np.float64)
        fast = p.ndim == 2 and self.mondrian != "class" and _kernels.use_for(p)
        if not fast:
            p = check_probs(p, where)
        if p.shape[1] != self.n_classes_:
            raise InputError(
                f"SplitConformal was fitted on {self.n_classes_} classes; 'probs' has {p.shape[1]} columns."
            )
        t = self._row_thresholds(groups, len(p))
        rnd = self.randomized and self.score != "lac"
        u = self._u(p) if rnd and not fast else None
        if fast:  # the compiled kernels validate (and hash rows into u) in the same read; check_probs names a problem
            if self.score == "lac":
                sets, ok = _kernels.lac_sets(p, 1.0 - t)
            else:
                sets, ok = _kernels.top_m_sets(
                    p,
                    np.broadcast_to(t[:, :1], (len(p), 1))[:, 0],
                    None,
                    self.lam_,
                    self.k_reg_,
                    seed=self.seed if rnd else None,
                )
            if not ok:
                check_probs(p, where)
        elif self.score == "lac":  # p >= 1 - q: one pass, no (n, K) temporary for 1 - p
            sets = p >= 1.0 - t
        elif (
            self.mondrian == "class"
        ):  # a threshold per candidate class: sets are not top-m, score every class
            sets = class_scores(p, self.score, u=u, lam=self.lam_, k_reg=self.k_reg_) <= t
        else:
            sets = _top_m_sets(p, t[:, :1], u, self.lam_, self.k_reg_)  # one threshold per row
        if not self.allow_empty:
            empty = ~sets.any(axis=1)
            sets[empty, p[empty].argmax(axis=1)] = True
        return sets

    def to_dict(self) -> dict[str, Any]:
        if not hasattr(self, "thresholds_"):
            raise NotFittedError(self)
        return {
            "method": self.score,
            "alpha": self.alpha,
            "randomized": self.randomized,
            "mondrian": self.mondrian,
            "allow_empty": self.allow_empty,
            "k_reg": self.k_reg_,
            "lam": self.lam_,
            "seed": self.seed,
            "label_noise": self.label_noise,
            "group_by": self.group_by,
            "threshold": threshold_to_json(self.threshold_),
            "sets": "full" if math.isinf(self.threshold_) else "thresholded",  # null threshold: every label
            "thresholds": [threshold_to_json(float(t)) for t in self.thresholds_],
            "group_thresholds": {k: threshold_to_json(v) for k, v in self.group_thresholds_.items()},
            "n": self.n_,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SplitConformal:
        obj = cls(
            alpha=float(d["alpha"]),
            score=d["method"],
            randomized=bool(d.get("randomized", False)),
            mondrian=d.get("mondrian"),
            allow_empty=bool(d.get("allow_empty", True)),
            seed=int(d.get("seed", 0)),
            label_noise=float(d.get("label_noise", 0.0)),
            group_by=d.get("group_by"),
        )
        obj.k_reg_, obj.lam_ = int(d.get("k_reg", 0)), float(d.get("lam", 0.0))
        obj.threshold_ = threshold_from_json(d["threshold"])  # null: unbounded (every label in the set)
        if not isinstance(d["thresholds"], list):
            raise ArtifactError(f"its conformal 'thresholds' is {str(d['thresholds'])[:40]!r}, not a list")
        obj.thresholds_ = np.array([threshold_from_json(t) for t in d["thresholds"]], dtype=np.float64)
        obj.group_thresholds_ = {
            str(k): threshold_from_json(v) for k, v in (d.get("group_thresholds") or {}).items()
        }
        obj.n_ = int(d["n"])
        obj.n_classes_ = len(obj.thresholds_)
        return obj
