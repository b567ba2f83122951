"""Cheap image features for the gradient-boosting stage of a cascade (numpy + PIL only).

One function, :func:`image_features`, computes them in training, evaluation and serving, from the same
resized uint8 pixels (:data:`FEATURE_SPEC`), so a served booster can never see different numbers from
the one that was trained. About 0.1 ms per image (resize included) on one CPU core — two orders of magnitude cheaper than
a small network, which is the point of a first cascade stage.

The features (``FEATURE_NAMES`` lists all of them):

- hue histogram of coloured pixels (12 bins of 30°), saturation and value histograms (4 bins each);
- fractions of orange, yellow, white-ish and dark pixels (cones, barriers, signs, night);
- edge density (gradient magnitude mean, share of strong edges, horizontal vs vertical energy);
- a coarse 4 × 4 spatial grid: orange/yellow share, brightness and edge density per cell;
- mean and standard deviation of R, G, B.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from roadwork.data.preprocess import PreprocessSpec, resize_uint8

__all__ = [
    "FEATURE_NAMES",
    "FEATURE_SPEC",
    "image_features",
    "images_features",
    "pixels_and_hsv",
    "small_image",
]

FEATURE_SPEC = PreprocessSpec(size=32)  # the pixels the features see (resize + centre crop)
"""The preprocessing of the cheap features: 32 px, resize + centre crop."""
_GRID = 4


def _names() -> list[str]:
    names = [f"hue_{i * 30:03d}" for i in range(12)]
    names += [f"sat_q{i}" for i in range(4)] + [f"val_q{i}" for i in range(4)]
    names += ["orange", "yellow", "whiteish", "dark"]
    names += ["edge_mean", "edge_strong", "edge_horizontal", "edge_vertical"]
    for what in ("warm", "bright", "edges"):
        names += [f"{what}_{r}{c}" for r in range(_GRID) for c in range(_GRID)]
    names += [f"{s}_{ch}" for s in ("mean", "std") for ch in "rgb"]
    return names


FEATURE_NAMES: list[str] = _names()
"""The name of every feature column, in order."""


def _cell_means(m: np.ndarray) -> np.ndarray:
    """(n, H, W) → (n, GRID*GRID) mean per cell of a coarse grid."""
    n, h, w = m.shape
    gh, gw = h // _GRID, w // _GRID
    cells = m[:, : gh * _GRID, : gw * _GRID].reshape(n, _GRID, gh, _GRID, gw)
    return cells.mean(axis=(2, 4)).reshape(n, _GRID * _GRID)


def _row_hist(bins: np.ndarray, mask: np.ndarray | None, k: int) -> np.ndarray:
    """(n, H, W) bin indices in [0, k) → (n, k) share of each row's pixels per bin (``mask``: count only those)."""
    n = len(bins)
    idx = bins.reshape(n, -1) + (np.arange(n) * k)[:, None]
    w = None if mask is None else mask.reshape(n, -1).astype(np.float32)
    counts = np.bincount(idx.ravel(), weights=None if w is None else w.ravel(), minlength=n * k)
    return (counts.reshape(n, k) / bins[0].size).astype(np.float32)


def small_image(im: Image.Image) -> Image.Image:
    """The pixels the features see: shrink by an integer factor (PIL's ``reduce``: a box filter, ~4x cheaper
    than a bilinear resize), then resize and centre-crop to :data:`FEATURE_SPEC`."""
    im = im.convert("RGB")
    factor = min(im.size) // FEATURE_SPEC.size
    if factor > 1:
        im = im.reduce(factor)
    return im


def pixels_and_hsv(images: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
    """PIL images → (n, S, S, 3) uint8 RGB and the same pixels in HSV (PIL's C conversion)."""
    rgb, hsv = [], []
    for im in images:
        small = small_image(im)
        if small.size != (FEATURE_SPEC.size, FEATURE_SPEC.size):
            small = Image.fromarray(resize_uint8(small, FEATURE_SPEC))
        rgb.append(np.asarray(small))
        hsv.append(np.asarray(small.convert("HSV")))
    if not rgb:
        z = np.zeros((0, FEATURE_SPEC.size, FEATURE_SPEC.size, 3), np.uint8)
        return z, z
    return np.stack(rgb), np.stack(hsv)


def image_features(rgb: np.ndarray, hsv: np.ndarray) -> np.ndarray:
    """(n, H, W, 3) uint8 RGB and HSV → (n, len(FEATURE_NAMES)) float32. Vectorised over the batch."""
    n = len(rgb)
    x = rgb.astype(np.float32) / np.float32(255.0)
    h = hsv[..., 0].astype(np.float32) * np.float32(360 / 256)
    s = hsv[..., 1].astype(np.float32) / np.float32(255)
    v = hsv[..., 2].astype(np.float32) / np.float32(255)
    coloured = (s > 0.25) & (v > 0.2)
    hue_hist = _row_hist(np.minimum(h // 30, 11).astype(np.intp), coloured, 12)
    sat_hist = _row_hist(np.minimum(s * 4, 3).astype(np.intp), None, 4)
    val_hist = _row_hist(np.minimum(v * 4, 3).astype(np.intp), None, 4)
    vivid = (s > 0.5) & (v > 0.4)
    orange = vivid & (h >= 8) & (h < 40)
    yellow = vivid & (h >= 40) & (h < 70)
    colours = np.stack([m.mean(axis=(1, 2)) for m in (orange, yellow, (s < 0.15) & (v > 0.8), v < 0.2)], 1)
    gray = x @ np.array([0.299, 0.587, 0.114], np.float32)
    gx = np.zeros_like(gray)
    gy = np.zeros_like(gray)
    gx[:, :, 1:-1] = gray[:, :, 2:] - gray[:, :, :-2]
    gy[:, 1:-1, :] = gray[:, 2:, :] - gray[:, :-2, :]
    mag = np.sqrt(gx * gx + gy * gy)
    edges = np.stack(
        [
            mag.mean(axis=(1, 2)),
            (mag > 0.25).mean(axis=(1, 2)),
            np.abs(gy).mean(axis=(1, 2)),  # horizontal structures (barriers, road markings)
            np.abs(gx).mean(axis=(1, 2)),  # vertical structures (cones, poles, signs)
        ],
        1,
    )
    grid = np.concatenate(
        [_cell_means((orange | yellow).astype(np.float32)), _cell_means(v), _cell_means(mag)], 1
    )
    flat = x.reshape(n, -1, 3)
    mean = flat.mean(axis=1)
    std = np.sqrt(np.maximum((flat * flat).mean(axis=1) - mean * mean, 0))
    stats = np.concatenate([mean, std], 1)
    out = np.concatenate([hue_hist, sat_hist, val_hist, colours, edges, grid, stats], 1)
    return out.astype(np.float32)


def images_features(images: Sequence[Image.Image], *, batch_size: int = 256) -> np.ndarray:
    """PIL images → features (the one path used in training, evaluation and serving)."""
    out = [np.zeros((0, len(FEATURE_NAMES)), np.float32)]
    for i in range(0, len(images), batch_size):
        out.append(image_features(*pixels_and_hsv(images[i : i + batch_size])))
    return np.concatenate(out)
