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
from pathlib import Path
from typing import Any

from roadwork._deps import require
from roadwork.errors import ArtifactError, InputError

__all__ = ["SIGNATURE_FILE", "generate_keypair", "sign_bundle", "verify_bundle"]

SIGNATURE_FILE = "signature.json"
"""The Ed25519 signature file ``roadwork sign`` writes into a bundle."""
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


def _checked_manifest(bundle_dir: Path) -> tuple[bytes, dict[str, Any]]:
    """The manifest's bytes, after checking that every file it lists matches its sha256."""
    from roadwork.export.bundle import file_sha256

    mpath = bundle_dir / "manifest.json"
    if not mpath.is_file():
        raise ArtifactError(f"{str(bundle_dir)!r} is not a roadwork bundle: it has no manifest.json.")
    raw = mpath.read_bytes()
    try:
        files = json.loads(raw)["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{str(mpath)!r} is not a valid bundle manifest: {e}") from None
    for name, digest in files.items():
        f = bundle_dir / name
        if not f.is_file():
            raise ArtifactError(f"Bundle file {name!r} is missing from {str(bundle_dir)!r}.")
        if file_sha256(f) != digest:
            raise ArtifactError(
                f"Bundle file {name!r} does not match its sha256 in manifest.json: it was modified after "
                "export. Re-export the bundle; do not edit it."
            )
    return raw, files


def _fingerprint(public_key: Any) -> str:
    serialization, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def sign_bundle(bundle_dir: str | Path, private_key: str | Path) -> Path:
    """Check every file against the manifest, then sign the manifest; returns ``signature.json``'s path."""
    root = Path(bundle_dir)
    key = _load_key(private_key, private=True)
    raw, _files = _checked_manifest(root)
    digest = hashlib.sha256(raw).hexdigest()
    sig = key.sign(_DOMAIN + digest.encode())
    out = root / SIGNATURE_FILE
    tmp = root / (SIGNATURE_FILE + ".tmp")
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
    tmp.replace(out)
    return out


def verify_bundle(bundle_dir: str | Path, public_key: str | Path) -> None:
    """Raise :class:`ArtifactError` unless the bundle carries a valid signature by ``public_key`` over its
    current manifest and every file matches the manifest."""
    from cryptography.exceptions import InvalidSignature

    root = Path(bundle_dir)
    key = _load_key(public_key, private=False)
    spath = root / SIGNATURE_FILE
    if not spath.is_file():
        raise ArtifactError(
            f"Bundle {str(root)!r} is not signed (no {SIGNATURE_FILE}) but require_signature is set; sign it "
            "with 'roadwork sign BUNDLE KEY'."
        )
    try:
        sig = json.loads(spath.read_text())
        signature = base64.b64decode(sig["signature"], validate=True)
        signed_digest = str(sig["manifest_sha256"])
    except (ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{str(spath)!r} is not a valid signature file: {e}") from None
    raw, _files = _checked_manifest(root)
    digest = hashlib.sha256(raw).hexdigest()
    if digest != signed_digest:
        raise ArtifactError(
            f"Bundle {str(root)!r}: manifest.json changed after it was signed; the bundle was altered. "
            "Re-export and re-sign it."
        )
    try:
        key.verify(signature, _DOMAIN + digest.encode())
    except InvalidSignature:
        theirs = sig.get("public_key_sha256", "?")
        raise ArtifactError(
            f"Bundle {str(root)!r}: the signature does not verify with {str(public_key)!r} (key sha256 "
            f"{_fingerprint(key)[:16]}…; signed by {str(theirs)[:16]}…). It was signed by another key or altered."
        ) from None
