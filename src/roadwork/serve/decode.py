"""Request bodies → images, with the limits a public endpoint needs. Raises :class:`RequestError` (HTTP 4xx)."""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from typing import Any

from PIL import Image

from roadwork.data.preprocess import decode_opened, shape_problem

__all__ = ["IMAGE_TYPES", "RequestError", "decode_b64", "decode_image"]

IMAGE_TYPES = (
    "image/jpeg",
    "image/png",
    "image/webp",
    "image/bmp",
    "image/tiff",
    "image/gif",
    "application/octet-stream",
)
"""Content types ``/v1/classify`` takes as a raw image body."""

# what roadwork predict reads from a folder (data.listing.IMAGE_SUFFIXES) is what the server decodes
_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF", "GIF")


class RequestError(Exception):
    """A client error: ``status`` (4xx) and a message that says what was wrong and how to fix it."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def __reduce__(self) -> tuple[Any, tuple[int, str]]:  # raised in a parsing process, re-raised here
        return (type(self), (self.status, self.message))


def decode_b64(text: object, field: str) -> bytes:
    """A base64 string (or data URL) of image bytes → the bytes; 400 naming ``field`` when it is not one."""
    if not isinstance(text, str) or not text:
        raise RequestError(400, f"'{field}' must be a non-empty base64 string of image bytes.")
    if text.startswith("data:") and "," in text:  # a data URL: data:image/jpeg;base64,....
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, f"'{field}' is not valid base64.") from None


def decode_image(
    data: bytes, *, max_pixels: int, what: str = "image", min_side: int | None = None
) -> Image.Image:
    """Decode bytes to RGB. Checks the pixel count from the header *before* decoding (decompression bombs).

    ``min_side``: the largest shorter side any consumer resizes to (``data.preprocess.decode_side`` of the
    model's spec, and of every cascade stage's): a JPEG is then reduced at decode (DCT scaling) to the
    smallest size whose shorter side is still >= it, so a queued request holds e.g. 240x135 pixels instead of
    1920x1080, and the pixels are those training decoded (``data.preprocess.load_rgb``, same ``min_side``)."""
    if not data:
        raise RequestError(400, f"{what} is empty (0 bytes); send JPEG/PNG/WebP/BMP/TIFF/GIF bytes.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))  # the header only; open_checked's checks, as 4xx answers
            w, h = im.size
            if w * h > max_pixels:
                raise RequestError(
                    400, f"{what} is {w}x{h} = {w * h} pixels, over the limit of {max_pixels}; resize it."
                )
            problem = shape_problem(w, h)
            if problem is not None:
                raise RequestError(400, f"{what} is {problem}.")
            if im.format not in _FORMATS:
                raise RequestError(415, f"{what} is {im.format}; send JPEG, PNG, WebP, BMP, TIFF or GIF.")
            return decode_opened(im, min_side)
    except RequestError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise RequestError(400, f"{what} looks like a decompression bomb: {e}") from None
    except Exception as e:  # PIL raises many types for corrupt or truncated data
        detail = re.sub(r"\s*<[^<>]* object at 0x[0-9a-fA-F]+>", "", str(e))  # no object reprs to clients
        raise RequestError(400, f"{what} cannot be decoded ({type(e).__name__}: {detail}).") from None
