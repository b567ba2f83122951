"""Cheap image features: shapes, meaning and independence from the batch they are computed in."""

from __future__ import annotations

import numpy as np
from PIL import Image

from roadwork.data.features import (
    FEATURE_NAMES,
    FEATURE_SPEC,
    image_features,
    images_features,
    pixels_and_hsv,
)


def _solid(rgb: tuple[int, int, int], size: int = 128) -> Image.Image:
    return Image.new("RGB", (size, size), rgb)


def test_shape_names_and_dtype() -> None:
    f = images_features([_solid((10, 20, 30)), _solid((200, 100, 0), 100)])
    assert f.shape == (2, len(FEATURE_NAMES)) and f.dtype == np.float32
    assert len(set(FEATURE_NAMES)) == len(FEATURE_NAMES)
    assert images_features([]).shape == (0, len(FEATURE_NAMES))


def test_features_mean_what_they_say() -> None:
    col = {n: i for i, n in enumerate(FEATURE_NAMES)}
    orange, night, white = images_features(
        [_solid((255, 120, 0)), _solid((5, 5, 10)), _solid((250, 250, 250))]
    )
    assert orange[col["orange"]] == 1.0 and orange[col["warm_00"]] == 1.0 and orange[col["yellow"]] == 0.0
    assert night[col["dark"]] == 1.0 and night[col["orange"]] == 0.0
    assert white[col["whiteish"]] == 1.0
    assert orange[col["edge_mean"]] == 0.0  # a flat image has no edges
    stripes = np.zeros((64, 64, 3), np.uint8)
    stripes[:, ::8] = 255  # vertical lines: vertical structure, no horizontal
    f = images_features([Image.fromarray(stripes)])[0]
    assert f[col["edge_vertical"]] > 0.1 and f[col["edge_horizontal"]] == 0.0
    np.testing.assert_allclose(orange[col["mean_r"]], 1.0, atol=1e-6)


def test_rows_do_not_depend_on_the_batch() -> None:
    rng = np.random.default_rng(0)
    ims = [Image.fromarray(rng.integers(0, 255, (96, 120, 3), dtype=np.uint8)) for _ in range(5)]
    together = images_features(ims)
    alone = np.concatenate([images_features([im]) for im in ims])
    np.testing.assert_array_equal(together, alone)
    rgb, hsv = pixels_and_hsv(ims)
    assert rgb.shape == (5, FEATURE_SPEC.size, FEATURE_SPEC.size, 3)
    np.testing.assert_array_equal(image_features(rgb, hsv), together)
