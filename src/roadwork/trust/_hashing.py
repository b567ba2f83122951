"""The mixer behind :func:`roadwork.trust.conformal.row_uniforms`, one definition for numpy and the numba kernels."""

from __future__ import annotations

import numpy as np


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser (Steele et al., 2014): a bijective 64-bit mixer, wrapping arithmetic. Written on
    uint64 operands only, so the same body runs on numpy arrays and, compiled by numba, on one uint64."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def seed_mix(seed: int) -> np.uint64:
    """What a row's hash is XORed with before the final mix: the mixed seed (any int, taken modulo 2^64)."""
    return np.uint64(splitmix64(np.array([seed % 2**64], dtype=np.uint64))[0])
