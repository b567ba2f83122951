"""Progress bars that keep logs clean: a tqdm bar on a terminal, nothing when output goes to a file or pipe.

A bar redrawn with carriage returns turns a 15-minute run's log into megabytes of frames. Here a bar is shown
only when its stream (stderr) is a terminal; otherwise it is disabled and callers print one line per epoch or
stage with :func:`progress_write` (it goes through ``tqdm.write`` so it never tears a live bar).
``ROADWORK_PROGRESS=1`` forces bars on (``0`` off) whatever the stream is.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any, TypeVar

__all__ = ["bars_enabled", "progress_bar", "progress_write"]

T = TypeVar("T")


def bars_enabled() -> bool:
    """Whether bars are drawn: ``ROADWORK_PROGRESS`` if set (1/0), else whether stderr is a terminal."""
    forced = os.environ.get("ROADWORK_PROGRESS", "").strip().lower()
    if forced in ("1", "true", "yes", "on"):
        return True
    if forced in ("0", "false", "no", "off"):
        return False
    stream = sys.stderr
    return bool(getattr(stream, "isatty", None) and stream.isatty())


def progress_bar(iterable: Iterable[T] | None = None, *, disable: bool = False, **kwargs: Any) -> Any:
    """``tqdm.auto.tqdm(iterable, **kwargs)``, disabled when ``disable`` or when bars are off (not a terminal).
    A disabled bar still iterates, counts and accepts ``set_postfix``/``update``: callers need no branches."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=disable or not bars_enabled(), **kwargs)


def progress_write(message: str) -> None:
    """One line of progress (an epoch, a stage), printed above any live bar."""
    from tqdm.auto import tqdm

    tqdm.write(message)
