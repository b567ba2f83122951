"""Ed25519 bundle signatures: roadwork sign, and serve require_signature= refusing what it must."""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("cryptography")

from roadwork.errors import ArtifactError, InputError
from roadwork.export.bundle import file_sha256
from roadwork.export.signing import generate_keypair, sign_bundle, verify_bundle


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
    assert main(["sign", str(bundle), str(key)]) == 0
    assert "signed" in capsys.readouterr().out
    app = create_app(bundle, settings)
    assert app.state.roadwork.model.bundle.path == bundle
    assert main(["sign", str(bundle)]) == 2
    assert "Usage: roadwork sign" in capsys.readouterr().err
    assert main(["sign", str(bundle), str(tmp_path / "nokey")]) == 2
    assert "roadwork sign keygen" in capsys.readouterr().err
