"""Calibrators beyond one temperature (numpy + scipy.optimize). Public through :mod:`roadwork.trust.calibration`.

Parametric, fitted by NLL with L-BFGS and analytic gradients, on ``x = z`` (logits) or ``x = log softmax(z)``:

- ``classwise_temperature``  ``z_k / T_k``
- ``vector``                 ``x ⊙ w + b``                                   (Guo et al., 2017)
- ``matrix``                 ``x W + b`` with ODIR regularisation            (Kull et al., 2019)
- ``dirichlet``              ``log softmax(z) W + b`` with ODIR              (Kull et al., 2019)

ODIR penalises the off-diagonal entries of ``W`` (λ / (K(K-1)) Σ_{i≠j} W_ij²) and the intercept
(μ / K Σ b_j²), so the map stays close to class-wise scaling unless the data insist.

Non-parametric, one-vs-rest on ``p = softmax(z)`` then renormalised (for two classes only class 1 is mapped
and class 0 is its complement): ``isotonic`` (pool-adjacent-violators, interpolated between block
centres) and ``histogram`` (equal-mass bins, bin frequency). ``beta`` (Kull et al., 2017; two classes):
``logit q = a ln p - b ln(1-p) + c``; if the fit gives ``a < 0`` or ``b < 0`` that term is dropped and the
rest refitted, which keeps the map monotone.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Literal

import numpy as np

from roadwork.errors import InputError, NotFittedError, bad_value
from roadwork.trust._checks import check_labels, check_logits, log_softmax, softmax

Family = Literal["classwise_temperature", "vector", "matrix", "dirichlet"]


def _onehot(y: np.ndarray, k: int) -> np.ndarray:
    out = np.zeros((len(y), k))
    out[np.arange(len(y)), y] = 1.0
    return out


class AffineCalibrator:
    """``z' = x W + b`` for one of the families above. Learned state: ``W_``, ``b_``."""

    def __init__(
        self,
        *,
        family: Family = "vector",
        reg_lambda: float = 1e-2,
        reg_mu: float = 1e-2,
        max_iter: int = 300,
    ) -> None:
        self.family = family
        self.reg_lambda = reg_lambda
        self.reg_mu = reg_mu
        self.max_iter = max_iter

    @property
    def kind(self) -> str:
        return self.family

    def _x(self, z: np.ndarray) -> np.ndarray:
        return log_softmax(z) if self.family == "dirichlet" else z

    def _unpack(self, theta: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.family == "classwise_temperature":
            return np.diag(np.exp(-theta)), np.zeros(k)
        if self.family == "vector":
            return np.diag(theta[:k]), theta[k:]
        return theta[: k * k].reshape(k, k), theta[k * k :]

    def fit(self, logits: object, labels: object) -> AffineCalibrator:
        from scipy.optimize import minimize

        where = f"{type(self).__name__}({self.family}).fit"
        if self.family not in ("classwise_temperature", "vector", "matrix", "dirichlet"):
            raise InputError(f"Unknown affine calibration family {self.family!r}.")
        z = check_logits(logits, where)
        y = check_labels(labels, len(z), z.shape[1], where)
        if len(z) == 0:
            raise InputError(f"{where} needs at least one calibration row; got 0.")
        n, k = z.shape
        x, onehot = self._x(z), _onehot(y, k)
        full = self.family in ("matrix", "dirichlet")
        off = 1.0 - np.eye(k)
        c_off = self.reg_lambda / max(k * (k - 1), 1)

        def loss_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
            w, b = self._unpack(theta, k)
            a = x @ w + b
            lp = log_softmax(a)
            loss = -float((lp * onehot).sum()) / n
            g = (np.exp(lp) - onehot) / n  # dNLL / da
            if self.family == "classwise_temperature":
                return loss, -np.diag(w) * (x * g).sum(axis=0)
            if self.family == "vector":
                return loss, np.concatenate([(x * g).sum(axis=0), g.sum(axis=0)])
            gw, gb = x.T @ g, g.sum(axis=0)
            if full:  # ODIR
                loss += c_off * float(((w * off) ** 2).sum()) + self.reg_mu / k * float((b**2).sum())
                gw = gw + 2 * c_off * w * off
                gb = gb + 2 * self.reg_mu / k * b
            return loss, np.concatenate([gw.ravel(), gb])

        if self.family == "classwise_temperature":
            theta0 = np.zeros(k)
        elif self.family == "vector":
            theta0 = np.concatenate([np.ones(k), np.zeros(k)])
        else:
            theta0 = np.concatenate([np.eye(k).ravel(), np.zeros(k)])
        res = minimize(loss_grad, theta0, jac=True, method="L-BFGS-B", options={"maxiter": self.max_iter})
        self.W_, self.b_ = self._unpack(res.x, k)
        return self

    def transform(self, logits: object) -> np.ndarray:
        if not hasattr(self, "W_"):
            raise NotFittedError(self)
        z = check_logits(logits, f"{type(self).__name__}.transform")
        if z.shape[1] != self.W_.shape[0]:
            raise InputError(
                f"The calibrator was fitted on {self.W_.shape[0]} classes; logits have {z.shape[1]}."
            )
        return self._x(z) @ self.W_ + self.b_

    def predict_proba(self, logits: object) -> np.ndarray:
        return softmax(self.transform(logits))

    def to_dict(self) -> dict[str, Any]:
        if not hasattr(self, "W_"):
            raise NotFittedError(self)
        return {"kind": self.family, "W": self.W_.tolist(), "b": self.b_.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AffineCalibrator:
        obj = cls(family=d["kind"])
        obj.W_, obj.b_ = np.asarray(d["W"], dtype=np.float64), np.asarray(d["b"], dtype=np.float64)
        return obj


def pav(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Isotonic (non-decreasing) least-squares fit by pool-adjacent-violators.

    Returns knots for ``np.interp``: the smallest and largest ``x`` of each block, both at the block's value —
    flat within a block, linear between blocks, as scikit-learn's ``IsotonicRegression`` predicts.
    """
    order = np.argsort(x, kind="stable")
    xs, ys = x[order], y[order]
    # start from groups of equal x (ties must share a value), then merge violators
    uniq, start = np.unique(xs, return_index=True)
    sums = np.add.reduceat(ys, start)
    cnt = np.diff(np.append(start, len(xs))).astype(np.float64)
    v_sum: list[float] = []
    v_cnt: list[float] = []
    v_lo: list[float] = []
    v_hi: list[float] = []
    for s, c, xx in zip(sums, cnt, uniq, strict=True):
        v_sum.append(s)
        v_cnt.append(c)
        v_lo.append(xx)
        v_hi.append(xx)
        while len(v_sum) > 1 and v_sum[-2] / v_cnt[-2] >= v_sum[-1] / v_cnt[-1]:
            s2, c2, _, h2 = v_sum.pop(), v_cnt.pop(), v_lo.pop(), v_hi.pop()
            v_sum[-1] += s2
            v_cnt[-1] += c2
            v_hi[-1] = h2
    value = np.asarray(v_sum) / np.asarray(v_cnt)
    lo, hi = np.asarray(v_lo), np.asarray(v_hi)
    knots_x = np.stack([lo, hi], axis=1).ravel()
    knots_y = np.repeat(value, 2)
    keep = np.append(True, np.diff(knots_x) > 0)  # a one-point block needs one knot
    return knots_x[keep], knots_y[keep]


class _OneVsRest(ABC):
    """Map each class's probability with a fitted 1-D function, then renormalise rows."""

    kind = ""

    @abstractmethod
    def _fit_1d(self, p: np.ndarray, hit: np.ndarray) -> dict[str, list[float]]: ...

    @abstractmethod
    def _apply_1d(self, p: np.ndarray, params: dict[str, list[float]]) -> np.ndarray: ...

    def _columns(self, k: int) -> list[int]:
        return [1] if k == 2 else list(range(k))

    def fit(self, logits: object, labels: object) -> Any:
        where = f"{type(self).__name__}.fit"
        z = check_logits(logits, where)
        y = check_labels(labels, len(z), z.shape[1], where)
        if len(z) == 0:
            raise InputError(f"{where} needs at least one calibration row; got 0.")
        p = softmax(z)
        self.k_ = z.shape[1]
        self.maps_ = {c: self._fit_1d(p[:, c], (y == c).astype(np.float64)) for c in self._columns(self.k_)}
        return self

    def predict_proba(self, logits: object) -> np.ndarray:
        if not hasattr(self, "maps_"):
            raise NotFittedError(self)
        where = f"{type(self).__name__}.predict_proba"
        z = check_logits(logits, where)
        if z.shape[1] != self.k_:
            raise bad_value(
                "logits", where, f"{self.k_} columns (the classes it was fitted on)", f"{z.shape[1]} columns"
            )
        p = softmax(z)
        if self.k_ == 2:
            q1 = np.clip(self._apply_1d(p[:, 1], self.maps_[1]), 0.0, 1.0)
            return np.stack([1.0 - q1, q1], axis=1)
        q = np.stack([self._apply_1d(p[:, c], self.maps_[c]) for c in range(self.k_)], axis=1)
        q = np.clip(q, 0.0, None)
        s = q.sum(axis=1, keepdims=True)
        return np.where(s > 0, q / np.where(s > 0, s, 1.0), 1.0 / self.k_)

    def transform(self, logits: object) -> np.ndarray:
        """Calibrated log-probabilities (what downstream code treats as calibrated logits)."""
        return np.log(np.clip(self.predict_proba(logits), 1e-300, None))

    def to_dict(self) -> dict[str, Any]:
        if not hasattr(self, "maps_"):
            raise NotFittedError(self)
        return {"kind": self.kind, "k": self.k_, "maps": {str(c): m for c, m in self.maps_.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        obj = cls()
        obj.k_ = int(d["k"])
        obj.maps_ = {int(c): m for c, m in d["maps"].items()}
        return obj


class IsotonicCalibrator(_OneVsRest):
    """Isotonic regression (Zadrozny & Elkan, 2002), one-vs-rest: each class's probability is mapped through the
    non-decreasing step function that pool-adjacent-violators fits to "is this the true class", interpolated
    between its steps; the rows are renormalised to sum to one."""

    kind = "isotonic"

    def _fit_1d(self, p: np.ndarray, hit: np.ndarray) -> dict[str, list[float]]:
        x, v = pav(p, hit)
        return {"x": x.tolist(), "y": v.tolist()}

    def _apply_1d(self, p: np.ndarray, params: dict[str, list[float]]) -> np.ndarray:
        return np.interp(p, params["x"], params["y"])


class HistogramBinning(_OneVsRest):
    """Histogram binning (Zadrozny & Elkan, 2001): each bin maps to its observed frequency.

    ``strategy="quantile"`` (default) uses equal-mass bins; ``"uniform"`` uses equal-width bins as netcal does,
    and maps an empty bin to its centre (netcal's fill value).
    """

    kind = "histogram"

    def __init__(self, *, n_bins: int = 15, strategy: Literal["quantile", "uniform"] = "quantile") -> None:
        self.n_bins = n_bins
        self.strategy = strategy

    def _fit_1d(self, p: np.ndarray, hit: np.ndarray) -> dict[str, list[float]]:
        inner = np.linspace(0, 1, self.n_bins + 1)[1:-1]
        if self.strategy == "uniform":
            edges = inner
            fill = (np.r_[0.0, edges] + np.r_[edges, 1.0]) / 2  # empty bin: its centre
        else:
            edges = np.unique(np.quantile(p, inner))  # equal-mass inner edges
        idx = np.searchsorted(edges, p, side="right")
        cnt = np.bincount(idx, minlength=len(edges) + 1)
        if self.strategy != "uniform":
            fill = np.bincount(idx, weights=p, minlength=len(edges) + 1) / np.maximum(cnt, 1)
        freq = np.bincount(idx, weights=hit, minlength=len(edges) + 1)
        value = np.where(cnt > 0, freq / np.maximum(cnt, 1), fill)
        return {"edges": edges.tolist(), "values": value.tolist()}

    def _apply_1d(self, p: np.ndarray, params: dict[str, list[float]]) -> np.ndarray:
        return np.asarray(params["values"])[np.searchsorted(np.asarray(params["edges"]), p, side="right")]


class BetaCalibrator:
    """Beta calibration of the positive-class probability (two classes only)."""

    kind = "beta"

    def fit(self, logits: object, labels: object) -> BetaCalibrator:
        from scipy.optimize import minimize

        z = check_logits(logits, "BetaCalibrator.fit")
        if z.shape[1] != 2:
            raise InputError(
                f"Beta calibration is for two classes; got {z.shape[1]}. Use calibrate.method="
                "'dirichlet' (its multi-class generalisation) or 'temperature'."
            )
        y = check_labels(labels, len(z), 2, "BetaCalibrator.fit").astype(np.float64)
        f = self._features(z)

        def fit_with(mask: np.ndarray) -> np.ndarray:
            def nll(theta: np.ndarray) -> tuple[float, np.ndarray]:
                t = f @ (theta * mask)
                q = 1.0 / (1.0 + np.exp(-t))
                loss = float(np.mean(np.logaddexp(0, t) - y * t))
                return loss, (f.T @ (q - y)) / len(y) * mask

            return minimize(nll, np.array([1.0, 1.0, 0.0]) * mask, jac=True, method="L-BFGS-B").x * mask

        mask = np.ones(3)
        theta = fit_with(mask)
        for j in (0, 1):  # a < 0 or b < 0 would make the map decreasing: drop that term and refit
            if theta[j] < 0:
                mask[j] = 0.0
                theta = fit_with(mask)
        self.coef_ = theta
        return self

    @staticmethod
    def _features(z: np.ndarray) -> np.ndarray:
        lp = log_softmax(z)
        return np.stack([lp[:, 1], -lp[:, 0], np.ones(len(z))], axis=1)  # ln p, -ln(1-p), 1

    def transform(self, logits: object) -> np.ndarray:
        if not hasattr(self, "coef_"):
            raise NotFittedError(self)
        t = self._features(check_logits(logits, "BetaCalibrator.transform")) @ self.coef_
        return np.stack([np.zeros_like(t), t], axis=1)  # softmax of (0, t) is (1 - q, q)

    def predict_proba(self, logits: object) -> np.ndarray:
        return softmax(self.transform(logits))

    def to_dict(self) -> dict[str, Any]:
        if not hasattr(self, "coef_"):
            raise NotFittedError(self)
        return {"kind": self.kind, "coef": self.coef_.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BetaCalibrator:
        obj = cls()
        obj.coef_ = np.asarray(d["coef"], dtype=np.float64)
        return obj
