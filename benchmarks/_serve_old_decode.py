"""``roadwork serve`` with the decode of before issue 17, for benchmarks/serve_load.py only.

Every JPEG is decoded in full (no DCT scaling) and then resized, as the server did before; the decoded-pixel
budget counts the full pixels. The library has no switch for this: it is patched here, in this process, before
the server's modules import the functions."""

from __future__ import annotations

import sys
from typing import Any

import roadwork.data.preprocess as pp

_decode = pp.decode_opened


def _full_decode(im: Any, min_side: int | None = None) -> Any:
    return _decode(im, None)


def _full_size(size: tuple[int, int], fmt: str | None, min_side: int | None) -> tuple[int, int]:
    return size


pp.decode_opened = _full_decode  # type: ignore[assignment]
pp.decoded_size = _full_size  # type: ignore[assignment]
print("serving with the old decode: full JPEG decode, then resize", flush=True)

from roadwork.cli import main  # noqa: E402  (after the patch: the server imports the patched functions)

sys.exit(main(sys.argv[1:]))
