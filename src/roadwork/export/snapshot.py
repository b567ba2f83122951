"""One read of a bundle folder: what is verified is what is loaded.

:func:`snapshot` opens the folder once (a directory descriptor: a ``current`` symlink flipped afterwards changes
nothing), reads ``manifest.json`` once, checks the signature over *those bytes* when a public key is given — before
any file the manifest lists is touched — refuses names that are not plain file names (absolute, ``..``, a
separator: nothing outside the folder is ever opened), opens each listed file without following symlinks, refuses
anything but a regular file (``/proc``, FIFOs, devices), and copies it, hashing as it reads, into a private
folder (mode 0700). Everything is then loaded from that copy, so the bytes hashed are the bytes run. The copy is
removed once the bundle is loaded (:meth:`Snapshot.close`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from roadwork.errors import ArtifactError

__all__ = ["MANIFEST_FILE", "SIGNATURE_FILE", "Snapshot", "check_name", "snapshot"]

MANIFEST_FILE = "manifest.json"
"""The bundle's manifest: schema, sha256 of every file, versions."""
SIGNATURE_FILE = "signature.json"
"""The Ed25519 signature file ``roadwork sign`` writes into a bundle."""
_MAX_MANIFEST = 16 * 2**20  # bytes: a manifest is a few KB
_BLOCK = 1 << 20


@dataclass
class Snapshot:
    """A verified private copy of a bundle's files (``dir``), the manifest's bytes and their parse."""

    source: Path
    dir: Path
    raw_manifest: bytes
    manifest: dict[str, Any]

    def close(self) -> None:
        """Remove the private copy (what was loaded from it stays loaded)."""
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_name(name: object, source: Path) -> str:
    """``name`` if it is a plain file name of the bundle folder, else :class:`ArtifactError`."""
    if (
        not isinstance(name, str)
        or name in ("", ".", "..")
        or name != os.path.basename(name)
        or "\\" in name
        or "\0" in name
        or len(name.encode("utf-8", "surrogateescape")) > 255
    ):
        raise ArtifactError(
            f"Bundle {str(source)!r}: its manifest lists {str(name)[:120]!r}, which is not a plain file name of the "
            "bundle folder (absolute, '..' or a separator); refused before anything was opened. Re-export the "
            "bundle."
        )
    return name


def _open_regular(dfd: int, name: str, source: Path) -> int:
    """A descriptor on ``name`` in the folder ``dfd``: no symlink followed, no blocking open, a regular file."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
    except FileNotFoundError:
        raise ArtifactError(f"Bundle file {name!r} is missing from {str(source)!r}.") from None
    except OSError as e:  # ELOOP: a symlink
        raise ArtifactError(
            f"Bundle file {name!r} of {str(source)!r} cannot be opened as a plain file ({e.strerror}); bundle files "
            "must be regular files, not links."
        ) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ArtifactError(f"Bundle file {name!r} of {str(source)!r} is not a regular file; refused.")
    return fd


def _read_small(dfd: int, name: str, source: Path, limit: int) -> bytes:
    fd = _open_regular(dfd, name, source)
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ArtifactError(f"Bundle file {name!r} of {str(source)!r} is over {limit} bytes; not a bundle's.")
    return data


def _copy_hashed(dfd: int, name: str, source: Path, dest: Path) -> str:
    """Copy ``name`` into ``dest`` and return the sha256 of exactly the bytes copied."""
    h = hashlib.sha256()
    fd = _open_regular(dfd, name, source)
    with os.fdopen(fd, "rb") as f, open(dest / name, "xb") as out:
        for chunk in iter(lambda: f.read(_BLOCK), b""):
            h.update(chunk)
            out.write(chunk)
    return h.hexdigest()


def _parse_manifest(raw: bytes, source: Path) -> dict[str, Any]:
    where = str(source / MANIFEST_FILE)
    try:
        manifest = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise ArtifactError(f"{where!r} is not a valid bundle manifest: {str(e)[:200]}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ArtifactError(f"{where!r} is not a valid bundle manifest: no 'files' table.")
    for name, digest in manifest["files"].items():
        check_name(name, source)
        if not isinstance(digest, str):
            raise ArtifactError(
                f"{where!r} is not a valid bundle manifest: the sha256 of {name!r} is not text."
            )
    return manifest


def snapshot(
    path: str | Path, *, check_signature: Callable[[bytes, bytes | None], None] | None = None
) -> Snapshot:
    """Read, verify and copy a bundle folder once (module docstring). ``check_signature(manifest, signature)``
    (:func:`roadwork.export.signing.signature_check`): called with the manifest's bytes and ``signature.json``'s
    (``None`` when there is none) before any listed file is opened; it raises to refuse."""
    source = Path(path)
    try:
        dfd = os.open(source, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise ArtifactError(
            f"{str(source)!r} is not a bundle folder ({e.strerror}). Pass the folder written by 'roadwork run' "
            "(runs/<name>/export/bundle)."
        ) from None
    try:
        try:
            raw = _read_small(dfd, MANIFEST_FILE, source, _MAX_MANIFEST)
        except ArtifactError as e:
            if "is missing" not in str(e):
                raise
            raise ArtifactError(
                f"{str(source)!r} is not a roadwork bundle: it has no manifest.json. Pass the bundle folder written "
                "by 'roadwork run' (runs/<name>/export/bundle)."
            ) from None
        if check_signature is not None:
            try:
                sig: bytes | None = _read_small(dfd, SIGNATURE_FILE, source, 1 << 16)
            except ArtifactError as e:
                if "is missing" not in str(e):
                    raise
                sig = None
            check_signature(raw, sig)
        manifest = _parse_manifest(raw, source)
        private = Path(tempfile.mkdtemp(prefix="roadwork-bundle-"))  # 0700: only this user
        try:
            for name, digest in manifest["files"].items():
                if _copy_hashed(dfd, name, source, private) != digest:
                    raise ArtifactError(
                        f"Bundle file {name!r} does not match its sha256 in manifest.json: it was modified or "
                        "corrupted after export. Re-export the bundle; do not edit it."
                    )
            (private / MANIFEST_FILE).write_bytes(raw)
        except BaseException:
            shutil.rmtree(private, ignore_errors=True)
            raise
        return Snapshot(source, private, raw, manifest)
    finally:
        os.close(dfd)
