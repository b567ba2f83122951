"""The one preprocessing path, shared by training, evaluation, export and serving (numpy + PIL only).

The :class:`PreprocessSpec` travels inside ``model.json`` and the bundle, so a served model can never
resize or normalise differently from the model that was evaluated.

Decoding is part of that path. A JPEG is reduced *at decode* (libjpeg's DCT scaling, ``Image.draft``) to the
smallest of 1/1, 1/2, 1/4, 1/8 of its size whose shorter side is still at least the resize target, then
resized and cropped; a 1920x1080 photo for a 96- or 224-px network is never decoded at full size. PNG, WebP,
BMP, TIFF and GIF are decoded in full (they have no such scaling). A file is only read if it is a regular file
(:mod:`roadwork.data.files`: a FIFO or ``/dev/zero`` named ``.jpg`` is refused, never waited on).

Every image becomes 8-bit RGB (:func:`to_rgb`): 8-bit modes as PIL converts them (an RGB image is left as is, so
its pixels are what they always were); a 16-bit greyscale image (PNG, TIFF: modes ``I;16*``, and ``I`` with values
in 0..65535, e.g. a 16-bit PGM) keeps its top 8 bits (``v >> 8``, as PIL reads 16-bit RGB), so it decodes like
the 8-bit version of the same photo (PIL's own conversion clips it to white); a float image (``F``) with values in
[0, 1] is scaled by 255. Other 32-bit integer or float images have no defined brightness and are refused. Which scale is chosen depends on the image and on the
*decode side* — the largest shorter side any consumer of the decoded image resizes to
(:func:`decode_side`) — so every path that must agree bit for bit (training, the bundle, the server) decodes
with the same decode side: :func:`load_for` / :func:`load_rgb` ``(min_side=...)`` here,
``serve.decode.decode_image(..., min_side=...)`` for request bytes. A cascade feeds one decoded image to
stages of different sizes: its decode side is the largest of them (``decode_side(model, small_net, features)``).
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from roadwork.data.files import read_regular
from roadwork.errors import ArtifactError

__all__ = [
    "MAX_ASPECT",
    "ImageTooLarge",
    "PreprocessSpec",
    "decode_opened",
    "decode_side",
    "decoded_size",
    "load_for",
    "load_resized",
    "load_rgb",
    "open_checked",
    "preprocess",
    "resize_uint8",
    "shape_problem",
    "to_float",
    "to_rgb",
]

_INTERP = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}
_DCT_SCALED = ("JPEG", "MPO")  # MPO: a JPEG with extra frames (phone cameras); frame 0 is a JPEG


@dataclass(frozen=True)
class PreprocessSpec:
    """Resize the shorter side to ``round(size / crop_pct)``, centre-crop ``size``, scale, normalise."""

    size: int = 96
    crop_pct: float = 1.0
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bilinear"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @property
    def resize_side(self) -> int:
        """The shorter side after the resize, before the centre crop."""
        return round(self.size / self.crop_pct)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessSpec:
        """The spec in ``d``; a field of the wrong type or out of range is an :class:`ArtifactError`."""
        size, crop, interp = d["size"], d["crop_pct"], d["interpolation"]
        if type(size) is not int or not 1 <= size <= 8192:
            raise ArtifactError(
                f"its preprocess 'size' is {str(size)[:40]!r}, not a side from 1 to 8192 pixels"
            )
        if type(crop) not in (int, float) or not 0.05 <= crop <= 1:
            raise ArtifactError(
                f"its preprocess 'crop_pct' is {str(crop)[:40]!r}, not a fraction in [0.05, 1]"
            )
        if not isinstance(interp, str) or interp not in _INTERP:
            raise ArtifactError(
                f"its preprocess 'interpolation' is {str(interp)[:40]!r}, not one of {', '.join(_INTERP)}"
            )
        for key in ("mean", "std"):
            v = d[key]
            if not (
                isinstance(v, list | tuple)
                and len(v) == 3
                and all(type(x) in (int, float) and math.isfinite(x) and (key == "mean" or x > 0) for x in v)
            ):
                kind = "finite numbers" if key == "mean" else "finite numbers > 0"
                raise ArtifactError(f"its preprocess {key!r} is {str(v)[:60]!r}, not 3 {kind}")
        return cls(
            size=size,
            crop_pct=float(crop),
            interpolation=interp,  # type: ignore[arg-type]  # one of _INTERP, checked above
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
        )


def decode_side(*specs: PreprocessSpec) -> int:
    """The decode side for images that every spec in ``specs`` will resize: the largest resize side.

    >>> decode_side(PreprocessSpec(size=48), PreprocessSpec(size=224, crop_pct=0.875))
    256
    """
    if not specs:
        raise ValueError("decode_side needs at least one PreprocessSpec")
    return max(s.resize_side for s in specs)


class ImageTooLarge(ValueError):
    """The header announces more pixels than allowed (a decompression bomb, or just too big)."""


MAX_ASPECT = 32
"""The widest image accepted (long side / short side): resizing the short side to the model's size makes a
1x60000 strip 96x5.8 M pixels (seconds of CPU and GBs for a 300-byte file). Panoramas are about 4:1."""


def shape_problem(w: int, h: int) -> str | None:
    """Why an image of ``w`` x ``h`` cannot be classified (empty, or a strip wider than :data:`MAX_ASPECT`:1)."""
    if w < 1 or h < 1:
        return f"{w}x{h} has no pixels"
    if max(w, h) > MAX_ASPECT * min(w, h):
        return f"{w}x{h} is wider than {MAX_ASPECT}:1; crop it to the part that matters"
    return None


def open_checked(
    src: str | Path | bytes, *, max_pixels: int | None = None, max_bytes: int | None = None
) -> Image.Image:
    """Open lazily and check the header only: nothing is decoded yet. Raises :class:`ImageTooLarge` when the
    header's width x height exceeds ``max_pixels`` or its shape is a strip (:func:`shape_problem`), and PIL's
    own bomb error beyond its limit. A path is read only if it is a regular file of at most ``max_bytes``
    (:func:`~roadwork.data.files.read_regular`; else :class:`~roadwork.data.files.UnreadableFile`)."""
    data = src if isinstance(src, bytes) else read_regular(src, max_bytes=max_bytes)
    im = Image.open(io.BytesIO(data))
    w, h = im.size
    if max_pixels is not None and w * h > max_pixels:
        im.close()
        raise ImageTooLarge(f"{w}x{h} = {w * h} pixels, over the limit of {max_pixels}")
    problem = shape_problem(w, h)
    if problem is not None:
        im.close()
        raise ImageTooLarge(problem)
    return im


def decode_opened(im: Image.Image, min_side: int | None = None) -> Image.Image:
    """Decode an image opened by :func:`open_checked` (or ``Image.open``) to RGB.

    With ``min_side``, a JPEG is decoded straight to the smallest DCT scale (1, 1/2, 1/4, 1/8) whose shorter
    side is >= ``min_side``; other formats, and ``min_side=None``, decode in full."""
    if min_side is not None and im.format in _DCT_SCALED:
        # draft's scale is min(W // w, H // h) rounded down to 8, 4, 2 or 1, so the shorter side stays
        # >= min_side: ceil(short / s) >= short // s >= min_side. Never below the resize target.
        im.draft("RGB", (min_side, min_side))
    im.load()
    return to_rgb(im)


_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(im: Image.Image) -> Image.Image:
    """Any decoded image as 8-bit RGB: ``im`` itself when it is RGB; 8-bit modes through PIL's ``convert``;
    16-bit greyscale (``I;16*``, or ``I`` within 0..65535) by its top 8 bits (``v >> 8``); float (``F``) within
    [0, 1] times 255, rounded. Other ``I``/``F`` images raise ``ValueError`` (PIL would clip them to white)."""
    if im.mode == "RGB":
        return im
    if im.mode not in (*_SIXTEEN_BIT, "I", "F"):
        return im.convert("RGB")
    a = np.asarray(im)
    if im.mode == "F":
        if not (np.isfinite(a).all() and a.min() >= 0 and a.max() <= 1):
            raise ValueError(
                f"a floating-point image with values from {a.min():g} to {a.max():g}: only [0, 1] has a defined "
                "brightness; save it as 8- or 16-bit"
            )
        u8 = np.rint(a.astype(np.float64) * 255).astype(np.uint8)
    else:
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise ValueError(
                f"a 32-bit integer image with values from {a.min()} to {a.max()}: only 0..65535 (16 bit) is "
                "read; save it as 8- or 16-bit"
            )
        u8 = (a.astype(np.uint32) >> 8).astype(np.uint8)  # '>u2' (I;16B) too: astype reads the byte order
    return Image.fromarray(u8).convert("RGB")


def decoded_size(size: tuple[int, int], fmt: str | None, min_side: int | None) -> tuple[int, int]:
    """The (width, height) :func:`decode_opened` yields for an image of ``size`` and format ``fmt`` (from the
    header; nothing decoded): what a server counts against a memory budget before decoding."""
    w, h = size
    if min_side is None or fmt not in _DCT_SCALED or min_side <= 0:
        return w, h
    scale = min(w // min_side, h // min_side)
    s = 8 if scale >= 8 else 4 if scale >= 4 else 2 if scale >= 2 else 1  # as Pillow's JpegImageFile.draft
    return -(-w // s), -(-h // s)


def load_rgb(
    src: str | Path | bytes,
    min_side: int | None = None,
    *,
    max_pixels: int | None = None,
    max_bytes: int | None = None,
) -> Image.Image:
    """Open an image file (or bytes) as RGB: in full, or with ``min_side`` reduced at decode (JPEG) to the
    smallest DCT scale whose shorter side is still >= ``min_side`` (see :func:`decode_side`). A path must be a
    regular file (of at most ``max_bytes``, see :func:`open_checked`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        im = open_checked(src, max_pixels=max_pixels, max_bytes=max_bytes)
    with im:
        out = decode_opened(im, min_side)
        return out.copy() if out is im else out  # the file closes with ``im``; keep decoded pixels only


def load_for(src: str | Path | bytes, *specs: PreprocessSpec, max_pixels: int | None = None) -> Image.Image:
    """Decode for consumers that resize with ``specs`` (the model; in a cascade also the small net and the
    features): ``load_rgb(src, decode_side(*specs))``."""
    return load_rgb(src, decode_side(*specs), max_pixels=max_pixels)


def load_resized(src: str | Path | bytes, spec: PreprocessSpec, min_side: int | None = None) -> np.ndarray:
    """Decode (at ``min_side``, default the spec's own resize side), resize and crop one image: uint8 array of
    shape (size, size, 3). What training reads; bit-identical to ``resize_uint8(load_rgb(src, min_side))``."""
    return resize_uint8(load_rgb(src, spec.resize_side if min_side is None else min_side), spec)


def resize_uint8(im: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """Resize and centre-crop one image: uint8 array of shape (size, size, 3)."""
    w, h = im.size
    short = spec.resize_side
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
    return to_float(np.stack([resize_uint8(to_rgb(im), spec) for im in images]), spec)
