"""Post-hoc calibration of logits (numpy + scipy.optimize; no torch).

Temperature scaling (Guo et al., 2017): ``p = softmax(z / T)`` with ``T`` minimising the NLL on the
calibration split, optimised over ``log T`` with L-BFGS and the analytic gradient. A single scalar
cannot change the ranking of the max-probability across images, and for two classes it cannot change
the ranking of any class score either: conformal and abstention thresholds fitted on the same split
stay valid exactly in the binary case and up to one fitted parameter otherwise.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import numpy as np

from roadwork.errors import InputError, NotFittedError
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
    "TemperatureScaler",
    "calibrator_from_dict",
    "make_calibrator",
]


class TemperatureScaler:
    """Fit one temperature by NLL. Learned state: ``temperature_``."""

    kind = "temperature"

    def __init__(self, *, max_iter: int = 100) -> None:
        self.max_iter = max_iter

    def fit(self, logits: object, labels: object) -> TemperatureScaler:
        from scipy.optimize import minimize

        z = check_logits(logits, "TemperatureScaler.fit")
        y = check_labels(labels, len(z), z.shape[1], "TemperatureScaler.fit")
        if len(z) == 0:
            raise InputError("TemperatureScaler.fit needs at least one calibration row; got 0.")
        zy = z[np.arange(len(z)), y]

        def nll_and_grad(log_t: np.ndarray) -> tuple[float, np.ndarray]:
            s = float(np.exp(-log_t[0]))  # 1 / T
            a = z * s
            lse = a.max(axis=1) + np.log(np.exp(a - a.max(axis=1, keepdims=True)).sum(axis=1))
            p = softmax(a)
            nll = float(np.mean(lse - zy * s))
            grad = -s * float(np.mean((p * z).sum(axis=1) - zy))  # dNLL/dlogT = dNLL/ds * (-s)
            return nll, np.array([grad])

        res = minimize(
            nll_and_grad,
            x0=np.zeros(1),
            jac=True,
            method="L-BFGS-B",
            bounds=[(np.log(1e-2), np.log(1e2))],
            options={"maxiter": self.max_iter},
        )
        self.temperature_ = float(np.exp(res.x[0]))
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
        obj.temperature_ = float(d["temperature"])
        return obj


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
METHODS: tuple[str, ...] = get_args(CalibrationMethod)
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


Calibrator = (
    TemperatureScaler
    | IdentityCalibrator
    | AffineCalibrator
    | IsotonicCalibrator
    | HistogramBinning
    | BetaCalibrator
    | AutoCalibrator
)


def calibrator_from_dict(d: dict[str, Any]) -> Calibrator:
    kind = d.get("kind")
    loaders: dict[str, Any] = {
        "temperature": TemperatureScaler.from_dict,
        "none": IdentityCalibrator.from_dict,
        "isotonic": IsotonicCalibrator.from_dict,
        "histogram": HistogramBinning.from_dict,
        "beta": BetaCalibrator.from_dict,
        **{f: AffineCalibrator.from_dict for f in ("classwise_temperature", "vector", "matrix", "dirichlet")},
    }
    if kind not in loaders:
        raise InputError(f"Unknown calibrator kind {kind!r} in policy; known kinds: {sorted(loaders)}.")
    return loaders[str(kind)](d)
