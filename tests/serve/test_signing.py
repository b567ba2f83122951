"""Ed25519 bundle signatures: roadwork sign, and serve require_signature= refusing what it must."""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("cryptography")

from roadwork.errors import ArtifactError, InputError
from roadwork.export.bundle import file_sha256
from roadwork.export.signing import generate_keypair, sign_bundle, verify_bundle
from tests.serve.conftest import rewrite_json


@pytest.fixture
def signed(tiny_run, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_run[1].bundle, bundle)
    pub = generate_keypair(tmp_path / "keys" / "release")
    sign_bundle(bundle, tmp_path / "keys" / "release")
    return bundle, pub


def test_a_signed_bundle_verifies_and_keys_are_kept_private(signed, tmp_path):
    bundle, pub = signed
    verify_bundle(bundle, pub)
    assert (tmp_path / "keys" / "release").stat().st_mode & 0o777 == 0o600
    sig = json.loads((bundle / "signature.json").read_text())
    assert sig["scheme"] == "ed25519" and sig["manifest_sha256"] == file_sha256(bundle / "manifest.json")
    with pytest.raises(InputError, match="exists already"):
        generate_keypair(tmp_path / "keys" / "release")


def test_tampering_plus_rehashing_the_manifest_is_refused(signed):
    bundle, pub = signed
    ref = bundle / "reference.json"
    target = ref if ref.is_file() else bundle / "policy.json"
    target.write_text(target.read_text() + " ")  # any change, however small
    with pytest.raises(ArtifactError, match="does not match its sha256"):
        verify_bundle(bundle, pub)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"][target.name] = file_sha256(target)  # the attacker re-hashes
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2))
    with pytest.raises(ArtifactError, match="changed after it was signed"):
        verify_bundle(bundle, pub)


def test_another_key_unsigned_and_forged_signatures_are_refused(signed, tmp_path):
    bundle, _pub = signed
    other = generate_keypair(tmp_path / "other")
    with pytest.raises(ArtifactError, match="does not verify"):
        verify_bundle(bundle, other)
    sig = json.loads((bundle / "signature.json").read_text())
    sign_bundle(bundle, tmp_path / "other")  # re-signed by the other key: the first no longer verifies it
    with pytest.raises(ArtifactError, match="does not verify"):
        verify_bundle(bundle, _pub)
    sig["signature"] = "AAAA" + sig["signature"][4:]
    (bundle / "signature.json").write_text(json.dumps(sig))
    with pytest.raises(ArtifactError, match="does not verify"):
        verify_bundle(bundle, _pub)
    (bundle / "signature.json").unlink()
    with pytest.raises(ArtifactError, match="is not signed"):
        verify_bundle(bundle, _pub)
    with pytest.raises(InputError, match="does not exist"):
        verify_bundle(bundle, tmp_path / "missing.pub")
    with pytest.raises(InputError, match="not a PEM public key"):
        verify_bundle(bundle, bundle / "policy.json")


def test_serve_requires_the_signature_and_the_cli_signs(tiny_run, tmp_path, capsys):
    from roadwork.cli import main
    from roadwork.serve import ServeSettings, create_app

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_run[1].bundle, bundle)
    key = tmp_path / "k"
    assert main(["sign", "keygen", str(key)]) == 0
    settings = ServeSettings(require_signature=str(key) + ".pub")
    with pytest.raises(ArtifactError, match="is not signed"):
        create_app(bundle, settings)
    image = str(next((tiny_run[1].run_dir / "data" / "images").glob("*.jpg")))
    assert main(["predict", str(bundle), image, f"require_signature={key}.pub"]) == 2
    assert "is not signed" in capsys.readouterr().err
    assert main(["sign", str(bundle), str(key)]) == 0
    assert "signed" in capsys.readouterr().out
    assert main(["predict", str(bundle), image, f"require_signature={key}.pub"]) == 0
    assert '"label"' in capsys.readouterr().out
    app = create_app(bundle, settings)
    assert app.state.roadwork.model.bundle.path == bundle
    assert main(["sign", str(bundle)]) == 2
    assert "Usage: roadwork sign" in capsys.readouterr().err
    assert main(["sign", str(bundle), str(tmp_path / "nokey")]) == 2
    assert "roadwork sign keygen" in capsys.readouterr().err


def test_a_symlink_flipped_after_the_signature_check_changes_nothing_loaded(signed, tmp_path, monkeypatch):
    """``current`` → a signed bundle; right after its signature is checked, ``current`` is flipped to a tampered
    copy. What loads is the signed bundle's policy, every time: the folder was opened once, before the flip."""
    import roadwork.export.signing as signing
    from roadwork.export.bundle import Bundle

    bundle, pub = signed
    evil = tmp_path / "evil"
    shutil.copytree(bundle, evil)
    rewrite_json(evil, "policy.json", lambda p: p["abstention"].update(threshold=0.0))  # answer everything
    current = tmp_path / "current"
    original = signing.verify_manifest

    def verify_then_flip(*args, **kwargs):  # type: ignore[no-untyped-def]
        original(*args, **kwargs)
        current.unlink()
        current.symlink_to(evil)  # the attacker's flip, after the check

    monkeypatch.setattr(signing, "verify_manifest", verify_then_flip)
    from roadwork.trust.policy import TrustPolicy

    want = TrustPolicy.load(bundle / "policy.json").to_dict()
    assert TrustPolicy.load(evil / "policy.json").to_dict() != want
    for _ in range(20):
        if current.is_symlink():
            current.unlink()
        current.symlink_to(bundle)
        loaded = Bundle.load(current, require_signature=pub)
        assert loaded.policy.to_dict() == want
        assert current.resolve() == evil.resolve()  # the flip happened, and changed nothing loaded


@pytest.mark.parametrize("name", ["/proc/self/pagemap", "../x", "/etc/passwd", "sub/../../x", "a\\b"])
def test_manifest_names_outside_the_folder_are_refused_before_anything_is_opened(signed, name, capsys):
    import time

    from roadwork.cli import main
    from roadwork.export.bundle import Bundle

    bundle, pub = signed
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"][name] = "0" * 64
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    t0 = time.monotonic()
    with pytest.raises(ArtifactError, match="not a plain file name"):
        Bundle.load(bundle)
    with pytest.raises(ArtifactError, match="changed after it was signed"):  # signed: the signature first
        Bundle.load(bundle, require_signature=pub)
    assert main(["predict", str(bundle), str(bundle / "model.json")]) == 2
    assert "not a plain file name" in capsys.readouterr().err
    assert time.monotonic() - t0 < 30  # nothing was read from /proc (which never ends)


def test_links_and_special_files_in_a_bundle_are_refused(signed, tmp_path):
    import os

    from roadwork.export.bundle import Bundle

    bundle, _ = signed
    manifest = json.loads((bundle / "manifest.json").read_text())
    (tmp_path / "elsewhere.json").write_text("{}")
    (bundle / "linked.json").symlink_to(tmp_path / "elsewhere.json")
    os.mkfifo(bundle / "pipe.json")  # opening a FIFO for reading would block forever
    for name, needle in (("linked.json", "not links"), ("pipe.json", "not a regular file")):
        m = dict(manifest, files={**manifest["files"], name: "0" * 64})
        (bundle / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(ArtifactError, match=needle):
            Bundle.load(bundle)
