"""Post-hoc calibration of logits (numpy + scipy.optimize; no torch).

Temperature scaling (Guo et al., 2017): ``p = softmax(z / T)`` with ``T`` minimising the NLL on the
calibration split, optimised over ``log T`` with L-BFGS and the analytic gradient. A single scalar
cannot change the ranking of the max-probability across images, and for two classes it cannot change
the ranking of any class score either: conformal and abstention thresholds fitted on the same split
stay valid exactly in the binary case and up to one fitted parameter otherwise.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from roadwork.errors import InputError, NotFittedError
from roadwork.trust._checks import check_labels, check_logits, log_softmax, softmax

__all__ = ["Calibrator", "IdentityCalibrator", "TemperatureScaler", "calibrator_from_dict", "make_calibrator"]


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


Calibrator = TemperatureScaler | IdentityCalibrator
_KINDS: dict[str, type[TemperatureScaler] | type[IdentityCalibrator]] = {
    "temperature": TemperatureScaler,
    "none": IdentityCalibrator,
}


def make_calibrator(method: str) -> Calibrator:
    try:
        return _KINDS[method]()
    except KeyError:
        raise InputError(f"Unknown calibration method {method!r}; choose one of {sorted(_KINDS)}.") from None


def calibrator_from_dict(d: dict[str, Any]) -> Calibrator:
    kind = d.get("kind")
    if kind not in _KINDS:
        raise InputError(f"Unknown calibrator kind {kind!r} in policy; known kinds: {sorted(_KINDS)}.")
    return _KINDS[kind].from_dict(d)
