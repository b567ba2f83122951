"""The one preprocessing path, shared by training, evaluation, export and serving (numpy + PIL only).

The :class:`PreprocessSpec` travels inside ``model.json`` and the bundle, so a served model can never
resize or normalise differently from the model that was evaluated.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

__all__ = ["PreprocessSpec", "load_rgb", "preprocess", "resize_uint8", "to_float"]

_INTERP = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}


@dataclass(frozen=True)
class PreprocessSpec:
    """Resize the shorter side to ``round(size / crop_pct)``, centre-crop ``size``, scale, normalise."""

    size: int = 96
    crop_pct: float = 1.0
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bilinear"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessSpec:
        return cls(
            size=int(d["size"]),
            crop_pct=float(d["crop_pct"]),
            interpolation=d["interpolation"],
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
        )


def load_rgb(src: str | Path | bytes) -> Image.Image:
    """Open an image file (or bytes) as RGB, fully decoded."""
    im = Image.open(io.BytesIO(src)) if isinstance(src, bytes) else Image.open(src)
    with im:
        return im.convert("RGB")


def resize_uint8(im: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """Resize and centre-crop one image: uint8 array of shape (size, size, 3)."""
    w, h = im.size
    short = round(spec.size / spec.crop_pct)
    scale = short / min(w, h)
    nw, nh = max(short, round(w * scale)), max(short, round(h * scale))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), _INTERP[spec.interpolation])
    left, top = (nw - spec.size) // 2, (nh - spec.size) // 2
    if (nw, nh) != (spec.size, spec.size):
        im = im.crop((left, top, left + spec.size, top + spec.size))
    return np.asarray(im, dtype=np.uint8)


@lru_cache(maxsize=32)
def _lut(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(3, 256) float32: every uint8 value of every channel, scaled and normalised with the same float32
    operations as the array form ``(u / 255 - mean) / std`` — so looking values up is bit-identical."""
    u = np.arange(256, dtype=np.float32) / np.float32(255.0)
    return np.stack([(u - np.float32(m)) / np.float32(s) for m, s in zip(mean, std, strict=True)])


def to_float(batch_uint8: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """(N, H, W, 3) uint8 → (N, 3, H, W) float32, scaled to [0, 1] and normalised. A table lookup per channel,
    written straight into channel-first layout: ~10x faster than the arithmetic on whole arrays, same bits."""
    lut = _lut(tuple(spec.mean), tuple(spec.std))
    n, h, w, _ = batch_uint8.shape
    out = np.empty((n, 3, h, w), np.float32)
    for c in range(3):
        np.take(lut[c], batch_uint8[..., c], out=out[:, c])
    return out


def preprocess(images: Sequence[Image.Image], spec: PreprocessSpec) -> np.ndarray:
    """PIL images → network input of shape (N, 3, size, size), float32."""
    if not images:
        return np.zeros((0, 3, spec.size, spec.size), np.float32)
    return to_float(np.stack([resize_uint8(im.convert("RGB"), spec) for im in images]), spec)
