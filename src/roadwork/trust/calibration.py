"""Post-hoc calibration of logits (numpy + scipy.optimize; no torch).

Temperature scaling (Guo et al., 2017): ``p = softmax(z / T)`` with ``T`` minimising the NLL on the
calibration split, optimised over ``log T`` with L-BFGS and the analytic gradient. A single scalar
cannot change the ranking of the max-probability across images, and for two classes it cannot change
the ranking of any class score either: conformal and abstention thresholds fitted on the same split
stay valid exactly in the binary case and up to one fitted parameter otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal, get_args

import numpy as np

from roadwork.errors import ArtifactError, InputError, NotFittedError
from roadwork.trust._calibrators import AffineCalibrator, BetaCalibrator, HistogramBinning, IsotonicCalibrator
from roadwork.trust._checks import check_labels, check_logits, log_softmax, softmax

__all__ = [
    "METHODS",
    "AffineCalibrator",
    "AutoCalibrator",
    "BetaCalibrator",
    "CalibrationMethod",
    "Calibrator",
    "HistogramBinning",
    "IdentityCalibrator",
    "IsotonicCalibrator",
    "SliceCalibrator",
    "TemperatureScaler",
    "calibrate_proba",
    "calibrator_from_dict",
    "make_calibrator",
]


class TemperatureScaler:
    """Fit one temperature by NLL. Learned state: ``temperature_``.

    The NLL is convex in ``β = 1/T`` (a log-sum-exp of a linear function), so the fit is a safeguarded Newton
    iteration on ``β`` with the exact gradient ``mean(E_p[d] - d_y)`` and curvature ``mean(Var_p[d])`` (``d`` the
    logits minus their row max): one pass over the logits per step, about five steps on the full data after a
    warm start on a 4096-row subsample. ``T`` is kept in ``[1e-2, 1e2]``.
    """

    kind = "temperature"

    def __init__(self, *, max_iter: int = 100, tol: float = 1e-10) -> None:
        self.max_iter = max_iter
        self.tol = tol

    def fit(self, logits: object, labels: object) -> TemperatureScaler:
        z = check_logits(logits, "TemperatureScaler.fit")
        y = check_labels(labels, len(z), z.shape[1], "TemperatureScaler.fit")
        if len(z) == 0:
            raise InputError("TemperatureScaler.fit needs at least one calibration row; got 0.")
        z_max = z.max(axis=1, keepdims=True)
        d_true = z[np.arange(len(z)), y] - z_max[:, 0]
        beta = 1.0
        if len(z) > 8192:  # warm start on a subsample; the full data then needs only a few steps
            sub = np.sort(np.random.default_rng(0).choice(len(z), 4096, replace=False))
            beta = _newton_beta(z[sub], z_max[sub], d_true[sub], 1.0, self.max_iter, 1e-6)
        self.temperature_ = 1.0 / _newton_beta(z, z_max, d_true, beta, self.max_iter, self.tol)
        return self

    def _t(self) -> float:
        if not hasattr(self, "temperature_"):
            raise NotFittedError(self)
        return self.temperature_

    def transform(self, logits: object) -> np.ndarray:
        """Calibrated logits (``z / T``)."""
        return check_logits(logits, "TemperatureScaler.transform") / self._t()

    def predict_proba(self, logits: object) -> np.ndarray:
        return softmax(self.transform(logits))

    def predict_log_proba(self, logits: object) -> np.ndarray:
        return log_softmax(self.transform(logits))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "temperature": self._t()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TemperatureScaler:
        obj = cls()
        t = d["temperature"]
        if type(t) not in (int, float) or not (math.isfinite(t) and t > 0):
            raise ArtifactError(f"its 'temperature' is {str(t)[:40]!r}, not a finite number > 0")
        obj.temperature_ = float(t)
        return obj


def _nll_derivatives(
    z: np.ndarray, z_max: np.ndarray, d_true: np.ndarray, beta: float
) -> tuple[float, float]:
    """Gradient and curvature in ``β`` of ``mean(logsumexp(β d) - β d_y)``, ``d = z - z_max``.

    Works through ``z`` in blocks of rows with one small reused buffer: a logits-sized temporary would cost
    more in page faults than the arithmetic.
    """
    n = len(z)
    step = max(1, (1 << 19) // z.shape[1])  # ~4 MB of float64 per block: stays in cache
    buf = np.empty((min(step, n), z.shape[1]))
    s0, s1, s2 = np.empty(n), np.empty(n), np.empty(n)
    for i in range(0, n, step):
        zb, e = z[i : i + step], buf[: min(step, n - i)]
        np.subtract(zb, z_max[i : i + step], out=e)  # d <= 0, so exp(β d) never overflows
        d = e.copy()
        np.multiply(e, beta, out=e)
        np.exp(e, out=e)
        s0[i : i + step] = e.sum(axis=1)
        np.multiply(e, d, out=e)
        s1[i : i + step] = e.sum(axis=1)
        s2[i : i + step] = np.einsum("ij,ij->i", e, d)
    mean_d = s1 / s0
    return float(np.mean(mean_d - d_true)), float(np.mean(s2 / s0 - mean_d**2))


def _newton_beta(
    z: np.ndarray, z_max: np.ndarray, d_true: np.ndarray, beta: float, max_iter: int, tol: float
) -> float:
    """Root of the (increasing) NLL gradient in β ∈ [1e-2, 1e2]: Newton steps, bisection when one leaves the
    bracket the evaluated points have established."""
    lo, hi = 1e-2, 1e2
    for _ in range(max_iter):
        g, h = _nll_derivatives(z, z_max, d_true, beta)
        if g > 0:
            hi = beta
        else:
            lo = beta
        step = g / h if h > 0 else np.inf
        new = beta - step
        if not lo < new < hi:
            new = (lo + hi) / 2 if np.isfinite(step) or hi - lo < 1e2 else (hi if g < 0 else lo)
            new = min(max(new, 1e-2), 1e2)
        if abs(new - beta) <= tol * beta or hi - lo <= tol * beta:
            return new
        beta = new
    return beta


class IdentityCalibrator:
    """No calibration: ``softmax(z)``. Lets ``calibrate.method=none`` flow through the same code."""

    kind = "none"

    def fit(self, logits: object, labels: object) -> IdentityCalibrator:
        z = check_logits(logits, "IdentityCalibrator.fit")
        check_labels(labels, len(z), z.shape[1], "IdentityCalibrator.fit")
        return self

    def transform(self, logits: object) -> np.ndarray:
        return check_logits(logits, "IdentityCalibrator.transform")

    def predict_proba(self, logits: object) -> np.ndarray:
        return softmax(self.transform(logits))

    def predict_log_proba(self, logits: object) -> np.ndarray:
        return log_softmax(self.transform(logits))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IdentityCalibrator:
        return cls()


CalibrationMethod = Literal[
    "none",
    "temperature",
    "classwise_temperature",
    "vector",
    "matrix",
    "dirichlet",
    "isotonic",
    "histogram",
    "beta",
    "auto",
]
"""The ``calibrate.method`` values: one calibrator each, ``auto`` picks by cross-validated NLL."""
METHODS: tuple[str, ...] = get_args(CalibrationMethod)
"""Every :data:`CalibrationMethod` value, in order (for help texts and validation)."""
_AUTO_CANDIDATES = ("temperature", "vector", "dirichlet", "isotonic", "histogram")


def make_calibrator(method: str) -> Calibrator:
    """A fresh calibrator for ``calibrate.method``."""
    if method == "none":
        return IdentityCalibrator()
    if method == "temperature":
        return TemperatureScaler()
    if method in ("classwise_temperature", "vector", "matrix", "dirichlet"):
        return AffineCalibrator(family=method)  # type: ignore[arg-type]
    if method == "isotonic":
        return IsotonicCalibrator()
    if method == "histogram":
        return HistogramBinning()
    if method == "beta":
        return BetaCalibrator()
    if method == "auto":
        return AutoCalibrator()
    raise InputError(f"Unknown calibration method {method!r}; choose one of {', '.join(METHODS)}.")


def _nll(probs: np.ndarray, y: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None))))


class AutoCalibrator:
    """Pick the calibrator with the lowest cross-validated NLL; refit it on all rows. Records why."""

    kind = "auto"

    def __init__(
        self, *, candidates: tuple[str, ...] = _AUTO_CANDIDATES, folds: int = 5, seed: int = 0
    ) -> None:
        self.candidates = candidates
        self.folds = folds
        self.seed = seed

    def fit(self, logits: object, labels: object) -> AutoCalibrator:
        z = check_logits(logits, "AutoCalibrator.fit")
        y = check_labels(labels, len(z), z.shape[1], "AutoCalibrator.fit")
        cands = [c for c in ("none", *self.candidates) if c != "beta" or z.shape[1] == 2]
        fold = np.random.default_rng(self.seed).permutation(len(z)) % self.folds
        scores: dict[str, float] = {}
        for name in cands:
            held = []
            for f in range(self.folds):
                tr, te = fold != f, fold == f
                if tr.sum() == 0 or te.sum() == 0:
                    continue
                held.append(
                    _nll(make_calibrator(name).fit(z[tr], y[tr]).predict_proba(z[te]), y[te]) * te.sum()
                )
            scores[name] = float(np.sum(held) / len(z))
        self.scores_ = scores
        self.chosen_ = min(scores, key=lambda k: scores[k])
        self.calibrator_ = make_calibrator(self.chosen_).fit(z, y)
        return self

    def _inner(self) -> Calibrator:
        if not hasattr(self, "calibrator_"):
            raise NotFittedError(self)
        return self.calibrator_

    def transform(self, logits: object) -> np.ndarray:
        return self._inner().transform(logits)

    def predict_proba(self, logits: object) -> np.ndarray:
        return self._inner().predict_proba(logits)

    def to_dict(self) -> dict[str, Any]:
        """The chosen calibrator's dict, plus why it was chosen (cross-validated NLL of every candidate)."""
        d = self._inner().to_dict()
        d["selection"] = {"by": f"{self.folds}-fold cross-validated NLL", "scores": self.scores_}
        return d


class SliceCalibrator:
    """One calibrator per value of a slice column (e.g. ``weather``), the global one for small or unseen values.

    Fits ``method`` on all rows and again on the rows of every slice value with at least ``min_count`` of
    them; at prediction each row uses its value's calibrator, or the global one (value below ``min_count``,
    unseen, or ``groups=None`` — a request without that metadata).
    """

    kind = "per_slice"

    def __init__(self, method: str, column: str, *, min_count: int = 200) -> None:
        self.method = method
        self.column = column
        self.min_count = min_count

    def fit(self, logits: object, labels: object, groups: object = None) -> SliceCalibrator:
        z = check_logits(logits, "SliceCalibrator.fit")
        y = check_labels(labels, len(z), z.shape[1], "SliceCalibrator.fit")
        if groups is None:
            raise InputError(
                f"SliceCalibrator.fit needs 'groups': the {self.column!r} value of every calibration row."
            )
        g = np.asarray(groups).astype(str)
        if g.shape != (len(z),):
            raise InputError(f"SliceCalibrator.fit: 'groups' has shape {g.shape}; expected ({len(z)},).")
        self.global_ = make_calibrator(self.method).fit(z, y)
        values, counts = np.unique(g, return_counts=True)
        self.per_value_ = {
            str(v): make_calibrator(self.method).fit(z[g == v], y[g == v])
            for v, c in zip(values, counts, strict=True)
            if c >= self.min_count
        }
        return self

    def predict_proba(self, logits: object, groups: object = None) -> np.ndarray:
        if not hasattr(self, "global_"):
            raise NotFittedError(self)
        z = check_logits(logits, "SliceCalibrator.predict_proba")
        out = self.global_.predict_proba(z)
        if groups is not None and self.per_value_:
            g = np.asarray(groups).astype(str)
            if g.shape != (len(z),):
                raise InputError(
                    f"SliceCalibrator.predict_proba: 'groups' has shape {g.shape}; expected ({len(z)},)."
                )
            for v, cal in self.per_value_.items():
                rows = g == v
                if rows.any():
                    out[rows] = cal.predict_proba(z[rows])
        return out

    def transform(self, logits: object) -> np.ndarray:
        """Log of the calibrated probabilities (rows without a slice value use the global calibrator)."""
        return np.log(np.clip(self.predict_proba(logits), 1e-300, None))

    def to_dict(self) -> dict[str, Any]:
        if not hasattr(self, "global_"):
            raise NotFittedError(self)
        return {
            "kind": self.kind,
            "method": self.method,
            "column": self.column,
            "min_count": self.min_count,
            "global": self.global_.to_dict(),
            "per_value": {v: c.to_dict() for v, c in self.per_value_.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SliceCalibrator:
        obj = cls(d["method"], d["column"], min_count=int(d["min_count"]))
        obj.global_ = calibrator_from_dict(d["global"])
        obj.per_value_ = {str(v): calibrator_from_dict(c) for v, c in d["per_value"].items()}
        return obj


Calibrator = (
    TemperatureScaler
    | IdentityCalibrator
    | AffineCalibrator
    | IsotonicCalibrator
    | HistogramBinning
    | BetaCalibrator
    | AutoCalibrator
    | SliceCalibrator
)
"""Any fitted calibrator: ``fit(logits, labels)``, ``predict_proba(logits)``, ``to_dict()``/``from_dict``."""


def calibrator_from_dict(d: dict[str, Any]) -> Calibrator:
    """The calibrator a ``to_dict()`` wrote, chosen by its ``kind``; an unknown kind is an :class:`InputError`."""
    kind = d.get("kind")
    loaders: dict[str, Any] = {
        "temperature": TemperatureScaler.from_dict,
        "none": IdentityCalibrator.from_dict,
        "isotonic": IsotonicCalibrator.from_dict,
        "histogram": HistogramBinning.from_dict,
        "beta": BetaCalibrator.from_dict,
        "per_slice": SliceCalibrator.from_dict,
        **{f: AffineCalibrator.from_dict for f in ("classwise_temperature", "vector", "matrix", "dirichlet")},
    }
    if kind not in loaders:
        raise InputError(f"Unknown calibrator kind {kind!r} in policy; known kinds: {sorted(loaders)}.")
    return loaders[str(kind)](d)


def calibrate_proba(
    calibrator: Calibrator, logits: object, slices: Mapping[str, Any] | None = None
) -> np.ndarray:
    """Calibrated probabilities; a :class:`SliceCalibrator` reads its column from ``slices`` when given."""
    if isinstance(calibrator, SliceCalibrator):
        return calibrator.predict_proba(logits, None if slices is None else slices.get(calibrator.column))
    return calibrator.predict_proba(logits)
