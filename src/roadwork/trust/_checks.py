"""Input checks at the trust layer's public boundary (one message template, see errors.bad_value)."""

from __future__ import annotations

import numpy as np

from roadwork.errors import InputError, bad_value


def check_logits(logits: object, where: str, name: str = "logits") -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] < 2:
        raise bad_value(
            name,
            where,
            "an array of shape (n_samples, n_classes) with n_classes >= 2",
            f"an array of shape {z.shape}",
        )
    # A finite total implies finite entries (NaN and inf propagate) without an (n, K) boolean temporary; a
    # total that overflows on huge finite values falls through to the exact check.
    if not np.isfinite(z.sum()) and not np.isfinite(z).all():
        bad = int((~np.isfinite(z)).any(axis=1).sum())
        raise InputError(
            f"The '{name}' parameter of {where} contains NaN or inf in {bad} row(s); "
            "remove those rows or fix the model that produced them."
        )
    return z


def check_probs(probs: object, where: str, name: str = "probs") -> np.ndarray:
    dtype = getattr(probs, "dtype", None)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 2 or p.size == 0:
        return check_logits(p, where, name)  # the shape error (or an empty array, which is fine)
    # Two passes: row sums near 1 and min >= 0 imply every entry is in [0, 1 + 1e-6]; NaN and inf make a row
    # sum NaN or inf, which fails the closeness test.
    sums_ok = bool(np.all(np.abs(p.sum(axis=1) - 1.0) <= 1e-6))
    if not sums_ok and not np.isfinite(p).all():
        check_logits(p, where, name)  # names the rows with NaN or inf
    if not sums_ok or not p.min() >= 0:
        low = dtype is not None and np.dtype(dtype).kind == "f" and np.dtype(dtype).itemsize < 4
        hint = (
            f" They are {np.dtype(dtype).name}, whose rounding moves row sums by up to ~1e-3: compute the "
            "softmax in float32/float64 (or pass logits)."
            if low
            else " Pass softmax outputs, or pass logits to the logits argument instead."
        )
        raise InputError(
            f"The '{name}' parameter of {where} must hold probabilities in [0, 1] whose rows sum "
            f"to 1 (within 1e-6).{hint}"
        )
    return p


def check_labels(labels: object, n: int, n_classes: int, where: str) -> np.ndarray:
    y = np.asarray(labels)
    if y.shape != (n,):
        raise bad_value("labels", where, f"an array of shape ({n},)", f"an array of shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0):
            y = y.astype(np.int64)
        else:
            raise bad_value("labels", where, "integer class indices", f"dtype {y.dtype}")
    if n and (y.min() < 0 or y.max() >= n_classes):
        raise bad_value(
            "labels", where, f"class indices in [0, {n_classes - 1}]", f"values in [{y.min()}, {y.max()}]"
        )
    return y.astype(np.int64)


def check_level(value: object, name: str, where: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float, np.floating))
        or not 0 < float(value) < 1
    ):
        raise bad_value(name, where, "a float in (0, 1)", value)
    return float(value)


def softmax(z: np.ndarray) -> np.ndarray:
    """Row softmax in float64 (probabilities are thresholded downstream, so no float32 here)."""
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))
