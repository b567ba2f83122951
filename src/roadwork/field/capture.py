"""``log_images``: the images a labeller will be sent (the audit sample and abstained answers), kept on disk under
their answer's id, bounded in bytes (the oldest go first)."""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Iterable
from pathlib import Path

from roadwork.errors import InputError

__all__ = ["ImageCapture"]

_MAGIC = (
    (b"\xff\xd8\xff", ".jpg"),
    (b"\x89PNG", ".png"),
    (b"RIFF", ".webp"),
    (b"GIF8", ".gif"),
    (b"BM", ".bmp"),
)


def _ext(blob: bytes) -> str:
    return next((ext for magic, ext in _MAGIC if blob.startswith(magic)), ".bin")


class ImageCapture:
    """A folder of captured images, ``<id><ext>``, at most ``max_bytes`` in all (thread-safe)."""

    def __init__(self, folder: str | Path, max_bytes: int) -> None:
        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(
                f"log_images={str(folder)!r}: cannot create the folder ({e}); pick another."
            ) from None
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        files = sorted(
            (p for p in self.folder.iterdir() if p.is_file() and not p.name.startswith(".")),
            key=lambda p: p.stat().st_mtime,
        )
        self._files: deque[tuple[Path, int]] = deque((p, p.stat().st_size) for p in files)
        self.total = sum(size for _, size in self._files)

    def add(self, items: Iterable[tuple[str, bytes]]) -> None:
        """Keep these images (``(id, bytes)``), each written whole (temporary file, rename); then drop the oldest
        until the folder is within ``max_bytes``."""
        for ident, blob in items:
            if len(blob) > self.max_bytes:
                continue
            safe = "".join(c for c in ident if c.isalnum() or c == "-")[:80]
            path = self.folder / f"{safe}{_ext(blob)}"
            tmp = self.folder / f".{safe}.tmp"
            tmp.write_bytes(blob)
            os.replace(tmp, path)
            with self._lock:
                self._files.append((path, len(blob)))
                self.total += len(blob)
                while self.total > self.max_bytes and self._files:
                    old, size = self._files.popleft()
                    old.unlink(missing_ok=True)
                    self.total -= size
