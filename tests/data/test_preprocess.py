"""The one preprocessing path: the table lookup gives exactly the bits of the arithmetic it replaced."""

from __future__ import annotations

import numpy as np
import pytest

from roadwork.data.preprocess import PreprocessSpec, to_float


@pytest.mark.parametrize(
    "spec", [PreprocessSpec(size=8), PreprocessSpec(size=5, mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 1.0))]
)
def test_to_float_is_bit_identical_to_the_arithmetic(spec: PreprocessSpec) -> None:
    u8 = np.random.default_rng(0).integers(0, 256, (7, spec.size, spec.size, 3), dtype=np.uint8)
    u8[0, 0, 0] = [0, 128, 255]
    x = u8.astype(np.float32) / np.float32(255.0)
    x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    ref = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    got = to_float(u8, spec)
    assert got.dtype == np.float32 and got.flags["C_CONTIGUOUS"] and got.shape == ref.shape
    np.testing.assert_array_equal(got, ref)
