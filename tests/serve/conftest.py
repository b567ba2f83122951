"""What the serve tests share: the tiny run's bundle (loaded once per module: online control changes a loaded
bundle's policy in place), its repository index entry, and a bundle file edited with its manifest re-hashed (what
an attacker who can write the folder does)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from roadwork.export.bundle import Bundle, file_sha256


@pytest.fixture(scope="module")
def bundle(tiny_run):  # type: ignore[no-untyped-def]
    return Bundle.load(tiny_run[1].bundle)


def ready_entry(bundle: Bundle, name: str = "tiny") -> dict[str, str]:
    """The repository index entry of the served bundle."""
    return {
        "name": name,
        "version": bundle.path.name,
        "state": "READY",
        "reason": "",
        "policy_version": bundle.policy_version,
    }


def rewrite_json(folder: Path, name: str, edit: Callable[[Any], None]) -> None:
    """Edit the bundle file ``name`` (JSON) in place and put its new sha256 in the manifest; a signature, if any,
    no longer matches."""
    data = json.loads((folder / name).read_text())
    edit(data)
    replace_file(folder, name, json.dumps(data).encode())


def replace_file(folder: Path, name: str, data: bytes) -> None:
    """Write ``data`` as the bundle file ``name`` and put its sha256 (and size, when the manifest records sizes) in
    the manifest, listing it if it was not: what an attacker who can write the folder (or a signer of anything)
    does."""
    (folder / name).write_bytes(data)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][name] = file_sha256(folder / name)
    if "sizes" in manifest:
        manifest["sizes"][name] = len(data)
    (folder / "manifest.json").write_text(json.dumps(manifest))
