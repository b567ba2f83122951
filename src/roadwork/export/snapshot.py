"""One read of a bundle folder: what is verified is what is loaded.

:func:`snapshot` opens the folder once (a directory descriptor: a ``current`` symlink flipped afterwards changes
nothing), reads ``manifest.json`` once, checks the signature over *those bytes* when a public key is given — before
any file the manifest lists is touched — refuses names that are not plain file names (absolute, ``..``, a
separator: nothing outside the folder is ever opened), opens each listed file without following symlinks, refuses
anything but a regular file (``/proc``, FIFOs, devices), and copies it, hashing as it reads, into a private
folder (mode 0700). Everything is then loaded from that copy, so the bytes hashed are the bytes run. The copy is
removed once the bundle is loaded (:meth:`Snapshot.close`), and at once when anything is refused.

Reads are bounded. The manifest records each file's size (``sizes``, signed with the rest): every listed file is
opened and its size checked before any is copied, and no more than that size (one byte more, to notice a file
that grows while read, as ``/proc`` files do: they report size 0) is ever read. A file whose size the manifest
does not record (a bundle exported before sizes were) is read up to the size it reports, and refused over
:data:`MAX_UNSIZED_FILE`. The copies must fit in ``TMPDIR``: that is checked before the first byte is written.
"""

from __future__ import annotations

import errno
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

__all__ = ["MANIFEST_FILE", "MAX_UNSIZED_FILE", "SIGNATURE_FILE", "Snapshot", "check_name", "snapshot"]

MANIFEST_FILE = "manifest.json"
"""The bundle's manifest: schema, sha256 and size of every file, versions."""
SIGNATURE_FILE = "signature.json"
"""The Ed25519 signature file ``roadwork sign`` writes into a bundle."""
MAX_UNSIZED_FILE = 2**31
"""The most bytes read of a bundle file whose size the manifest does not record (bundles exported before sizes
were recorded): 2 GiB, the most an ONNX model without external data can hold. Re-export to record sizes."""
_MAX_MANIFEST = 16 * 2**20  # bytes: a manifest is a few KB
_FIX = "Re-export the bundle; do not edit it."
_BLOCK = 1 << 20


@dataclass
class Snapshot:
    """A verified private copy of a bundle's files (``dir``), the manifest's bytes and their parse."""

    source: Path
    dir: Path
    raw_manifest: bytes
    manifest: dict[str, Any]
    sizes: dict[str, int]  # the size of every listed file's verified bytes (what ``dir`` holds)

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


def _open_listed(dfd: int, manifest: dict[str, Any], source: Path) -> dict[str, tuple[int, int]]:
    """Every listed file opened (:func:`_open_regular`), with the bytes to copy: its size, checked against the
    manifest's (or :data:`MAX_UNSIZED_FILE` without one) before anything is copied. The caller closes them."""
    opened: dict[str, tuple[int, int]] = {}
    try:
        for name in manifest["files"]:
            fd = _open_regular(dfd, name, source)
            opened[name] = (fd, -1)
            size, recorded = _file_size(fd), manifest.get("sizes", {}).get(name)
            if recorded is not None and size != recorded:
                raise ArtifactError(
                    f"Bundle file {str(source / name)!r} does not match its sha256 in manifest.json: it is {size} "
                    f"bytes, the manifest says {recorded} (refused unread). It was modified or corrupted after "
                    f"export. {_FIX}"
                )
            if recorded is None and size > MAX_UNSIZED_FILE:
                raise ArtifactError(
                    f"Bundle file {str(source / name)!r} is {size} bytes and its manifest records no size: over the "
                    f"{MAX_UNSIZED_FILE} read from a bundle exported before sizes were recorded (refused unread). "
                    "Re-export the bundle: its manifest then records every file's size."
                )
            opened[name] = (fd, size)
    except BaseException:
        for fd, _ in opened.values():
            os.close(fd)
        raise
    return opened


def _file_size(fd: int) -> int:
    """The size a file reports (``/proc`` files report 0 and read on: the reader bounds what it reads)."""
    return os.fstat(fd).st_size


def _copy_hashed(fd: int, name: str, source: Path, dest: Path, size: int) -> str:
    """Copy ``size`` bytes of ``fd`` into ``dest/name`` and return the sha256 of exactly the bytes copied; a file
    that turns out longer (one byte more is read to tell) or shorter is refused."""
    h = hashlib.sha256()
    left = size + 1
    try:
        with open(dest / name, "xb") as out:
            while left > 0 and (chunk := os.read(fd, min(_BLOCK, left))):
                h.update(chunk)
                out.write(chunk)
                left -= len(chunk)
    except OSError as e:
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        raise ArtifactError(
            f"Bundle file {str(source / name)!r} could not be copied into {str(dest)!r} ({e.strerror or e})"
            + ("; free space there, or point TMPDIR at a larger disk." if full else ".")
        ) from None
    if left != 1:
        raise ArtifactError(
            f"Bundle file {str(source / name)!r} does not match its sha256 in manifest.json: it reported {size} "
            f"bytes, but {'more' if left == 0 else 'fewer'} were read (not a plain file of the bundle, or it "
            f"changed while read). {_FIX}"
        )
    return h.hexdigest()


def _check_room(private: Path, opened: dict[str, tuple[int, int]], source: Path) -> None:
    """The copies fit in ``private``'s disk, said before the first byte is written."""
    need, free = sum(size for _, size in opened.values()), shutil.disk_usage(private).free
    if need > free:
        raise ArtifactError(
            f"Bundle {str(source)!r} needs {need} bytes in {str(private.parent)!r} (TMPDIR) to be loaded, which has "
            f"{free} free; free space there, or point TMPDIR at a larger disk."
        )


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
    sizes = manifest.get("sizes", {})
    if not isinstance(sizes, dict):
        raise ArtifactError(f"{where!r} is not a valid bundle manifest: 'sizes' is not a table. {_FIX}")
    for name, size in sizes.items():
        if name not in manifest["files"] or type(size) is not int or size < 0:
            raise ArtifactError(
                f"{where!r} is not a valid bundle manifest: 'sizes' gives {str(name)[:120]!r} "
                f"{str(size)[:40]!r}, not the byte count of a listed file. {_FIX}"
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
        return _copy_listed(dfd, source, raw, manifest)
    finally:
        os.close(dfd)


def _copy_listed(dfd: int, source: Path, raw: bytes, manifest: dict[str, Any]) -> Snapshot:
    """The private copy of every listed file, each hashed as copied; nothing of it is left when one is refused."""
    opened = _open_listed(dfd, manifest, source)
    private = None
    try:
        private = Path(tempfile.mkdtemp(prefix="roadwork-bundle-"))  # 0700: only this user
        _check_room(private, opened, source)
        for name, (fd, size) in opened.items():
            if _copy_hashed(fd, name, source, private, size) != manifest["files"][name]:
                raise ArtifactError(
                    f"Bundle file {str(source / name)!r} does not match its sha256 in manifest.json: it was modified "
                    f"or corrupted after export. {_FIX}"
                )
        (private / MANIFEST_FILE).write_bytes(raw)
    except BaseException:
        if private is not None:
            shutil.rmtree(private, ignore_errors=True)
        raise
    finally:
        for fd, _ in opened.values():
            os.close(fd)
    return Snapshot(source, private, raw, manifest, {name: size for name, (_, size) in opened.items()})
