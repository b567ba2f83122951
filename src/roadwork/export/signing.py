"""Ed25519 bundle signatures: who exported this bundle, and has anything in it changed since?

The manifest lists the sha256 of every file of the bundle, so a signature over the manifest covers them all:
``roadwork sign BUNDLE KEY`` checks every listed file against the manifest, then writes ``signature.json``
(the manifest's sha256 and an Ed25519 signature of it, made with the ``cryptography`` library).
:func:`verify_bundle` (``roadwork serve BUNDLE require_signature=PUBKEY``) refuses a bundle that is unsigned,
signed by another key, whose manifest changed after signing (someone re-hashed tampered files), or whose files
no longer match the manifest. Keys are PEM files: PKCS#8 private, SubjectPublicKeyInfo public
(``roadwork sign keygen KEY`` writes ``KEY`` and ``KEY.pub``; OpenSSL's ``genpkey -algorithm ed25519`` too).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from roadwork._deps import require
from roadwork.errors import ArtifactError, InputError
from roadwork.export.snapshot import SIGNATURE_FILE, snapshot

__all__ = [
    "SIGNATURE_FILE",
    "generate_keypair",
    "load_private_key",
    "load_public_key",
    "sign_bundle",
    "signature_check",
    "verify_bundle",
    "verify_manifest",
]

_DOMAIN = b"roadwork-bundle-signature-v1\n"  # what is signed: this prefix + the manifest's sha256 (hex)


def _crypto() -> Any:
    require("cryptography")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return serialization, ed25519


def generate_keypair(private_path: str | Path) -> Path:
    """Write a new Ed25519 private key to ``private_path`` (mode 0600) and its public key beside it
    (``<private_path>.pub``); returns the public key's path. Refuses to overwrite a key."""
    serialization, ed25519 = _crypto()
    priv = Path(private_path)
    pub = priv.with_name(priv.name + ".pub")
    for p in (priv, pub):
        if p.exists():
            raise InputError(f"{str(p)!r} exists already; pick another path (keys are never overwritten).")
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    priv.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(priv, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return pub


def _load_key(path: str | Path, private: bool) -> Any:
    serialization, ed25519 = _crypto()
    p = Path(path)
    what = "private" if private else "public"
    if not p.is_file():
        hint = " Create a key pair with 'roadwork sign keygen KEY'." if private else ""
        raise InputError(f"The {what} key {str(p)!r} does not exist.{hint}")
    data = p.read_bytes()
    try:
        key = (
            serialization.load_pem_private_key(data, password=None)
            if private
            else serialization.load_pem_public_key(data)
        )
    except (ValueError, TypeError) as e:
        raise InputError(f"{str(p)!r} is not a PEM {what} key ({e}).") from None
    want = ed25519.Ed25519PrivateKey if private else ed25519.Ed25519PublicKey
    if not isinstance(key, want):
        raise InputError(f"{str(p)!r} is a {type(key).__name__}; bundle signatures use Ed25519 keys.")
    return key


def load_private_key(path: str | Path) -> Any:
    """The Ed25519 private key in a PEM file, or :class:`InputError` saying what is wrong with the file."""
    return _load_key(path, private=True)


def load_public_key(path: str | Path) -> Any:
    """The Ed25519 public key in a PEM file, or :class:`InputError` saying what is wrong with the file."""
    return _load_key(path, private=False)


def _checked_manifest(bundle_dir: Path) -> bytes:
    """The manifest's bytes, after checking (one read, :mod:`roadwork.export.snapshot`) that every file it lists
    is a plain regular file of the folder matching its sha256."""
    with snapshot(bundle_dir) as snap:
        return snap.raw_manifest


def _fingerprint(public_key: Any) -> str:
    serialization, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def sign_bundle(bundle_dir: str | Path, private_key: str | Path) -> Path:
    """Check every file against the manifest, then sign the manifest; returns ``signature.json``'s path."""
    root = Path(bundle_dir)
    key = _load_key(private_key, private=True)
    raw = _checked_manifest(root)
    digest = hashlib.sha256(raw).hexdigest()
    sig = key.sign(_DOMAIN + digest.encode())
    out = root / SIGNATURE_FILE
    tmp = root / (SIGNATURE_FILE + ".tmp")
    try:
        _write_signature(tmp, digest, key, sig)
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves nothing half-written
        raise
    return out


def _write_signature(tmp: Path, digest: str, key: Any, sig: bytes) -> None:
    tmp.write_text(
        json.dumps(
            {
                "scheme": "ed25519",
                "manifest_sha256": digest,
                "public_key_sha256": _fingerprint(key.public_key()),
                "signature": base64.b64encode(sig).decode(),
            },
            indent=2,
        )
    )


def verify_bundle(bundle_dir: str | Path, public_key: str | Path) -> None:
    """Raise :class:`ArtifactError` unless the bundle carries a valid signature by ``public_key`` over its
    manifest and every file matches the manifest (one read: :func:`roadwork.export.snapshot.snapshot`)."""
    snapshot(bundle_dir, check_signature=signature_check(public_key, Path(bundle_dir))).close()


def signature_check(public_key: str | Path, source: Path) -> Callable[[bytes, bytes | None], None]:
    """What :func:`~roadwork.export.snapshot.snapshot` calls on a bundle's manifest and signature bytes: the key
    is loaded now (a missing or malformed key is the caller's error, said before the bundle is read)."""
    load_public_key(public_key)

    def check(raw: bytes, signature_file: bytes | None) -> None:
        if signature_file is None:
            raise ArtifactError(
                f"Bundle {str(source)!r} is not signed (no {SIGNATURE_FILE}) but require_signature is set; sign "
                "it with 'roadwork sign BUNDLE KEY'."
            )
        verify_manifest(raw, signature_file, public_key, source)

    return check


def verify_manifest(raw: bytes, signature_file: bytes, public_key: str | Path, source: Path) -> None:
    """Raise :class:`ArtifactError` unless ``signature_file`` (``signature.json``'s bytes) is a valid signature by
    ``public_key`` over exactly the manifest bytes ``raw``."""
    from cryptography.exceptions import InvalidSignature

    key = _load_key(public_key, private=False)
    spath = source / SIGNATURE_FILE
    try:
        sig = json.loads(signature_file)
        signature = base64.b64decode(sig["signature"], validate=True)
        signed_digest = str(sig["manifest_sha256"])
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise ArtifactError(f"{str(spath)!r} is not a valid signature file: {str(e)[:200]}") from None
    digest = hashlib.sha256(raw).hexdigest()
    if digest != signed_digest:
        raise ArtifactError(
            f"Bundle {str(source)!r}: manifest.json changed after it was signed; the bundle was altered. "
            "Re-export and re-sign it."
        )
    try:
        key.verify(signature, _DOMAIN + digest.encode())
    except InvalidSignature:
        theirs = sig.get("public_key_sha256", "?") if isinstance(sig, dict) else "?"
        raise ArtifactError(
            f"Bundle {str(source)!r}: the signature does not verify with {str(public_key)!r} (key sha256 "
            f"{_fingerprint(key)[:16]}…; signed by {str(theirs)[:16]}…). It was signed by another key or altered."
        ) from None
