"""Reading a file a user named (an image, a manifest): only a regular file is ever opened, and reads are bounded.

A FIFO named ``a.jpg`` blocks ``open`` until a writer comes (forever); ``/dev/zero``, or a symlink to it named
``z.jpg``, never ends; a folder or a socket cannot be read at all. So every place that opens or hashes a
user-supplied image or manifest (``roadwork predict``, batch prediction, the data stage, the one decode path)
goes through this module:

- :func:`file_problem` says why a path is not a readable regular file (after following symlinks), from
  ``os.stat`` alone: nothing is opened.
- :func:`open_regular` opens one without blocking (``O_NONBLOCK``) and checks the opened descriptor again, so a
  file swapped for a FIFO after the check is still refused, never waited on.
- :func:`read_regular` reads one whole, at most ``max_bytes``.

Symlinks are followed (a photo library of links is fine); what they point to must be a regular file.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

__all__ = ["UnreadableFile", "file_problem", "open_regular", "read_regular"]

_OPEN_FLAGS = (
    os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
)
_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


class UnreadableFile(OSError):
    """A path that is not a readable regular file: missing, not a regular file (a FIFO, a device, a folder),
    empty, or over the size limit. Its message is the reason, as the skipped-file lists show it."""


def _stat_problem(st: os.stat_result, max_bytes: int | None) -> str | None:
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a file")
        return f"not a regular file ({kind}); only regular files are read"
    if st.st_size == 0:
        return "zero-byte file"
    if max_bytes is not None and st.st_size > max_bytes:
        return f"file too large ({st.st_size / 2**20:.1f} MiB > {max_bytes / 2**20:.1f} MiB)"
    return None


def file_problem(path: str | Path, *, max_bytes: int | None = None) -> str | None:
    """Why ``path`` cannot be read as one file (missing, not a regular file after following symlinks, zero
    bytes, over ``max_bytes``), or ``None``. Only ``os.stat``: nothing is opened.

    >>> file_problem("/dev/null")
    'not a regular file (a character device); only regular files are read'
    """
    try:
        st = os.stat(path)
    except OSError as e:
        return f"unreadable: {e.strerror or e}"
    return _stat_problem(st, max_bytes)


def open_regular(path: str | Path, *, max_bytes: int | None = None) -> BinaryIO:
    """``path`` opened for binary reading if it is a regular file (see :func:`file_problem`), else
    :class:`UnreadableFile`. The open never blocks, and the opened descriptor is checked again."""
    reason = file_problem(path, max_bytes=max_bytes)  # first: a device is never even opened
    if reason is not None:
        raise UnreadableFile(reason)
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as e:
        raise UnreadableFile(f"unreadable: {e.strerror or e}") from None
    reason = _stat_problem(os.fstat(fd), max_bytes)  # what was opened, should it have changed since the stat
    if reason is not None:
        os.close(fd)
        raise UnreadableFile(reason)
    return os.fdopen(fd, "rb")


def read_regular(path: str | Path, *, max_bytes: int | None = None) -> bytes:
    """The bytes of a regular file (see :func:`open_regular`); never more than ``max_bytes`` are read, even from
    a file that grows while it is read."""
    with open_regular(path, max_bytes=max_bytes) as f:
        data = f.read() if max_bytes is None else f.read(max_bytes + 1)
    if max_bytes is not None and len(data) > max_bytes:
        raise UnreadableFile(f"file too large (over {max_bytes / 2**20:.1f} MiB)")
    return data
