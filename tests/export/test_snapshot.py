"""The one read of a bundle is bounded: a listed file is never read past the size the (signed) manifest records,
one whose size differs is refused before anything is copied, a bundle from before sizes is read up to a cap, and a
refusal leaves nothing in TMPDIR."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

import roadwork.export.snapshot as snapshot_module
from roadwork.errors import ArtifactError
from roadwork.export.bundle import Bundle
from roadwork.export.snapshot import snapshot

pytest.importorskip("cryptography")


@pytest.fixture
def signed(tiny_run, tmp_path, monkeypatch):
    """A signed copy of the tiny bundle (its manifest records sizes), and a TMPDIR of its own to look into."""
    from roadwork.export.signing import generate_keypair, sign_bundle

    bundle = tmp_path / "runs" / "x" / "export" / "bundle"
    shutil.copytree(tiny_run[1].bundle, bundle)
    pub = generate_keypair(tmp_path / "key")
    sign_bundle(bundle, tmp_path / "key")
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    return bundle, pub


def _copies(tmp: Path) -> list[str]:
    return [p.name for p in tmp.iterdir() if p.name.startswith("roadwork-bundle-")]


def test_a_file_of_another_size_than_signed_is_refused_unread(signed, tmp_path):
    """model.onnx replaced by a sparse file, after signing (the signature still verifies: the manifest is the
    signed one): refused on its size, before a byte is copied (it was copied whole into TMPDIR, then hashed)."""
    bundle, pub = signed
    size = (bundle / "model.onnx").stat().st_size
    (bundle / "model.onnx").unlink()
    with open(bundle / "model.onnx", "wb") as f:
        f.truncate(size + (64 << 20))  # sparse: nothing on disk, 64 MiB to read
    with pytest.raises(
        ArtifactError, match=f"it is {size + (64 << 20)} bytes, the manifest says {size}"
    ) as err:
        Bundle.load(bundle, require_signature=pub)
    assert f"{str(bundle / 'model.onnx')!r} does not match its sha256" in str(err.value)
    assert "refused unread" in str(err.value) and not list((tmp_path / "tmp").iterdir())


def test_a_file_that_reads_past_its_size_is_refused_at_one_byte_more(signed, tmp_path, monkeypatch):
    """A file that reports the recorded size but reads on (a /proc file reports 0 and never ends; a file that
    grows while read): no more than the size + 1 byte is read, then it is refused, and nothing is left."""
    bundle, _ = signed
    size = (bundle / "policy.json").stat().st_size
    with open(bundle / "policy.json", "ab") as f:
        f.write(b" " * (1 << 20))

    def lying_size(fd: int) -> int:  # the grown file reports what the manifest says
        real = os.fstat(fd).st_size
        return size if real == size + (1 << 20) else real

    copied: list[int] = []
    real_copy = snapshot_module._copy_hashed

    def counting_copy(fd: int, name: str, source: Path, dest: Path, n: int) -> str:
        try:
            return real_copy(fd, name, source, dest, n)
        finally:
            copied.append((dest / name).stat().st_size if (dest / name).exists() else 0)

    monkeypatch.setattr(snapshot_module, "_file_size", lying_size)
    monkeypatch.setattr(snapshot_module, "_copy_hashed", counting_copy)
    with pytest.raises(ArtifactError, match="more were read") as err:
        snapshot(bundle)
    assert str(bundle / "policy.json") in str(err.value)
    assert copied[-1] == size + 1  # the one byte that told
    assert not _copies(tmp_path / "tmp")


def test_a_bundle_without_sizes_is_read_up_to_a_cap(signed, tmp_path, monkeypatch):
    """A manifest from before sizes were recorded loads as before; a file over the cap is refused unread, and a
    file that reads past the size it reports (a /proc file: size 0) is refused at its first byte."""
    bundle, _ = signed
    cap = snapshot_module.MAX_UNSIZED_FILE
    monkeypatch.setattr(snapshot_module, "MAX_UNSIZED_FILE", 1)
    Bundle.load(bundle)  # the cap is for files without a recorded size
    monkeypatch.setattr(snapshot_module, "MAX_UNSIZED_FILE", cap)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest.pop("sizes")
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    Bundle.load(bundle)
    biggest = max((bundle / n).stat().st_size for n in manifest["files"])
    monkeypatch.setattr(snapshot_module, "MAX_UNSIZED_FILE", biggest - 1)
    with pytest.raises(ArtifactError, match="its manifest records no size") as err:
        snapshot(bundle)
    assert "refused unread" in str(err.value) and "Re-export the bundle" in str(err.value)
    monkeypatch.setattr(snapshot_module, "MAX_UNSIZED_FILE", biggest)
    monkeypatch.setattr(snapshot_module, "_file_size", lambda fd: 0)  # what /proc/<pid>/pagemap reports
    with pytest.raises(ArtifactError, match="it reported 0 bytes, but more were read"):
        snapshot(bundle)
    assert not _copies(tmp_path / "tmp")


def test_a_hash_mismatch_names_the_bundle_file_and_leaves_nothing_in_tmpdir(signed, tmp_path):
    bundle, pub = signed
    data = bytearray((bundle / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    (bundle / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match its sha256") as err:
        Bundle.load(bundle, require_signature=pub)
    assert f"Bundle file {str(bundle / 'model.onnx')!r}" in str(err.value)
    assert not _copies(tmp_path / "tmp")


def test_a_bundle_that_does_not_fit_in_tmpdir_is_refused_before_copying(signed, tmp_path, monkeypatch):
    bundle, _ = signed
    free = shutil.disk_usage(tmp_path)._replace(free=1000)
    monkeypatch.setattr(snapshot_module.shutil, "disk_usage", lambda path: free)
    with pytest.raises(ArtifactError, match=r"which has 1000 free; free space there, or point TMPDIR"):
        Bundle.load(bundle)
    assert not _copies(tmp_path / "tmp")


@pytest.mark.parametrize("sizes", [[1], {"model.onnx": -1}, {"model.onnx": "12"}, {"other.bin": 3}])
def test_a_sizes_table_that_is_not_byte_counts_of_listed_files_is_refused(signed, sizes):
    bundle, _ = signed
    manifest = json.loads((bundle / "manifest.json").read_text())
    (bundle / "manifest.json").write_text(json.dumps(manifest | {"sizes": sizes}))
    with pytest.raises(ArtifactError, match="is not a valid bundle manifest: 'sizes'"):
        snapshot(bundle)
