"""Reading a bundle: every JSON file of it malformed in any way is our error naming the bundle's own file (never a
traceback, never the deleted private copy), and every manifest writer records the sizes the reader bounds its
reads with."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from roadwork.errors import ArtifactError
from roadwork.export.bundle import RUNTIME_FILE, Bundle, record_runtime_choice
from tests.serve.conftest import replace_file

DEEP = "[" * 1200 + "]" * 1200  # deeper than json's recursion limit


@pytest.fixture
def bundle(tiny_run, tmp_path):
    folder = tmp_path / "runs" / "x" / "export" / "bundle"
    shutil.copytree(tiny_run[1].bundle, folder)
    return folder


@pytest.fixture
def image(tiny_run):
    return str(sorted((tiny_run[1].run_dir / "data" / "images").glob("*.jpg"))[0])


def _edited(folder: Path, name: str, edit) -> str:  # type: ignore[no-untyped-def]
    data = json.loads((folder / name).read_text())
    edit(data)
    return json.dumps(data)


def _one(folder: Path, pattern: str) -> str:
    names = sorted(p.name for p in folder.glob(pattern))
    assert names, f"the tiny bundle has a {pattern} (a cascade with a tree stage and a network stage)"
    return names[0]


CASES = {
    "deep policy": ("policy.json", lambda b: DEEP, "nested too deeply"),
    "deep model card": ("model.json", lambda b: DEEP, "nested too deeply"),
    "deep stage card": ("stage*-model.json", lambda b: DEEP, "nested too deeply"),
    "deep tree table": ("stage*-trees.json", lambda b: DEEP, "nested too deeply"),
    "deep reference": ("reference.json", lambda b: DEEP, "nested too deeply"),
    "policy array": ("policy.json", lambda b: "[]", "holds an array"),
    "policy null": ("policy.json", lambda b: "null", "holds null"),
    "policy cascade string": (
        "policy.json",
        lambda b: _edited(b, "policy.json", lambda p: p.update(cascade="cascade")),
        "wrong type",
    ),
    "policy stages number": (
        "policy.json",
        lambda b: _edited(b, "policy.json", lambda p: p["cascade"].update(stages=3)),
        "wrong type",
    ),
    "policy stage kind": (
        "policy.json",
        lambda b: _edited(b, "policy.json", lambda p: p["cascade"]["stages"][1].update(kind="gpu")),
        "not a boosting table or a network",
    ),
    "model card array": ("model.json", lambda b: "[]", "holds an array"),
    "model card classes number": (
        "model.json",
        lambda b: _edited(b, "model.json", lambda d: d.update(classes=5)),
        "not a list of class names",
    ),
    # wrongly typed fields that loaded and then failed per request (an outside reviewer's variants)
    "policy classes string": (
        "policy.json",
        lambda b: _edited(b, "policy.json", lambda p: p.update(classes="x")),
        "not a list of class names",
    ),
    "policy positive class list": (
        "policy.json",
        lambda b: _edited(b, "policy.json", lambda p: p.update(positive_class=[])),
        "not one of its classes",
    ),
    "policy thresholds table": (
        "policy.json",
        lambda b: _edited(b, "policy.json", lambda p: p["conformal"].update(thresholds={})),
        "'thresholds' is",
    ),
    "stage card interpolation": (
        "stage*-model.json",
        lambda b: _edited(
            b, _one(b, "stage*-model.json"), lambda d: d["preprocess"].update(interpolation="x")
        ),
        "'interpolation' is 'x'",
    ),
    "stage card mean string": (
        "stage*-model.json",
        lambda b: _edited(b, _one(b, "stage*-model.json"), lambda d: d["preprocess"].update(mean="x")),
        "'mean' is 'x', not 3 finite numbers",
    ),
    "stage card size negative": (
        "stage*-model.json",
        lambda b: _edited(b, _one(b, "stage*-model.json"), lambda d: d["preprocess"].update(size=-1)),
        "'size' is '-1'",
    ),
    "model-alone policy temperature zero": (
        "policy-model.json",
        lambda b: _edited(b, "policy-model.json", lambda p: p["calibrator"].update(temperature=0)),
        "'temperature' is '0'",
    ),
    "model-alone policy temperature NaN": (
        "policy-model.json",
        lambda b: _edited(b, "policy-model.json", lambda p: p["calibrator"].update(temperature=None)),
        "'temperature' is 'None'",
    ),
}


def _set_stage_file(value: object):  # type: ignore[no-untyped-def]
    return lambda b: _edited(b, "policy.json", lambda p: p["cascade"]["stages"][0].update(file=value))


SERVED = {  # loaded before, then every request failed (a traceback from predict, a 500 from the server)
    "stage file null": ("policy.json", _set_stage_file(None), "has file 'None', not a plain file name"),
    "stage file list": ("policy.json", _set_stage_file([]), r"has file '\[\]'"),
    "stage file table": ("policy.json", _set_stage_file({}), r"has file '\{\}'"),
    "stage file number": ("policy.json", _set_stage_file(0), "has file '0'"),
    "stage gate string": (
        "policy.json",
        lambda b: _edited(b, "policy.json", lambda p: p["cascade"]["stages"][0]["info"].update(gate="x")),
        "served path fails",
    ),
    "thresholds empty": (
        "policy.json",
        lambda b: _edited(b, "policy.json", lambda p: p["conformal"].update(thresholds=[])),
        "served path fails",
    ),
    "answers string": (
        "manifest.json",
        lambda b: _edited(b, "manifest.json", lambda m: m["export"].update(answers="x")),
        "served path fails",
    ),
    **{  # each image would be decoded to this side: a billion pixels, a negative or a text side
        f"decode side {side!r}": (
            "manifest.json",
            lambda b, side=side: _edited(b, "manifest.json", lambda m: m["export"].update(decode_side=side)),
            r"'export.decode_side' is .*not a side in pixels from 1 to 16384",
        )
        for side in (10**9, -3, 0, "96", 96.5, True)
    },
}


@pytest.mark.parametrize("case", list(SERVED))
def test_a_signed_bundle_whose_served_path_would_fail_is_refused_at_load(
    bundle, image, tmp_path, capsys, case
):
    """The files parse, but the stage file, the cascade gate, the conformal thresholds or the manifest's answers
    record would fail every request: the load refuses it (ArtifactError naming the bundle; the CLI exits 2)."""
    from roadwork.cli import main
    from roadwork.export.signing import generate_keypair, sign_bundle

    name, content, why = SERVED[case]
    if name == "manifest.json":
        (bundle / name).write_text(content(bundle))
    else:
        replace_file(bundle, name, content(bundle).encode())
    pub = generate_keypair(tmp_path / "key")
    sign_bundle(bundle, tmp_path / "key")
    with pytest.raises(ArtifactError, match=why) as err:
        Bundle.load(bundle, require_signature=pub)
    assert "roadwork-bundle-" not in str(err.value)
    assert main(["predict", str(bundle), image, f"require_signature={pub}"]) == 2
    assert capsys.readouterr().err.startswith("error: ")


@pytest.mark.parametrize("case", list(CASES))
def test_a_malformed_json_file_of_a_signed_bundle_is_our_error_naming_it(
    bundle, image, tmp_path, capsys, case
):
    """Validly signed (the signer put these bytes there): RecursionError, AttributeError, TypeError were
    tracebacks (exit 1). Now: ArtifactError naming runs/x/export/bundle/NAME and the fix; the CLI exits 2."""
    from roadwork.cli import main
    from roadwork.export.signing import generate_keypair, sign_bundle

    pattern, content, why = CASES[case]
    name = _one(bundle, pattern)
    replace_file(bundle, name, content(bundle).encode())
    pub = generate_keypair(tmp_path / "key")
    sign_bundle(bundle, tmp_path / "key")
    with pytest.raises(ArtifactError, match=why) as err:
        Bundle.load(bundle, require_signature=pub)
    message = str(err.value)
    assert f"{str(bundle / name)!r} is not a valid" in message and "Re-export the bundle" in message
    assert "roadwork-bundle-" not in message  # not the private copy, deleted by the time anyone reads this
    assert main(["predict", str(bundle), image, f"require_signature={pub}"]) == 2
    err_text = capsys.readouterr().err
    assert err_text.startswith("error: ") and str(bundle / name) in err_text


@pytest.mark.parametrize(
    "record", [DEEP, "[]", json.dumps({"variant": 5}), json.dumps({"variant": "fp32", "threads": "all"})]
)
def test_a_malformed_runtime_choice_is_our_error_with_variant_auto(bundle, capsys, record):
    from roadwork.cli import main

    replace_file(bundle, RUNTIME_FILE, record.encode())
    Bundle.load(bundle)  # a named variant does not read it
    with pytest.raises(ArtifactError, match="is not a valid runtime choice") as err:
        Bundle.load(bundle, variant="auto")
    assert str(bundle / RUNTIME_FILE) in str(err.value) and "select=true again" in str(err.value)
    assert main(["serve", str(bundle), "variant=auto"]) == 2
    assert f"error: {str(bundle / RUNTIME_FILE)!r}" in capsys.readouterr().err


def test_a_model_the_runtime_rejects_is_named_by_the_bundle_path_not_the_private_copy(bundle):
    replace_file(bundle, "model.onnx", b"not an ONNX model")
    with pytest.raises(ArtifactError, match="ONNX Runtime cannot load") as err:
        Bundle.load(bundle)
    assert str(bundle / "model.onnx") in str(err.value) and "roadwork-bundle-" not in str(err.value)


@pytest.mark.parametrize("table", ["variants", "export"])
def test_a_manifest_table_of_the_wrong_type_is_our_error(bundle, table):
    manifest = json.loads((bundle / "manifest.json").read_text())
    (bundle / "manifest.json").write_text(json.dumps(manifest | {table: ["x"]}))
    with pytest.raises(ArtifactError, match=f"{table!r} is .*not a table"):
        Bundle.load(bundle, variant="auto")


def test_every_manifest_writer_records_each_file_size_and_signing_covers_them(bundle, tmp_path):
    """The export writes sizes; ``bench select=true`` (record_runtime_choice) adds runtime.json's; a signature
    covers them (a size edited after signing is refused); a bundle from before sizes loads as before."""
    from roadwork.export.signing import generate_keypair, sign_bundle, verify_bundle

    def sizes_match(folder: Path) -> dict[str, int]:
        manifest = json.loads((folder / "manifest.json").read_text())
        assert list(manifest["sizes"]) == list(manifest["files"])
        assert manifest["sizes"] == {n: (folder / n).stat().st_size for n in manifest["files"]}
        return dict(manifest["sizes"])

    sizes_match(bundle)
    record_runtime_choice(bundle, {"variant": "fp32", "threads": 1})
    assert RUNTIME_FILE in sizes_match(bundle)
    assert Bundle.load(bundle, variant="auto").runtime["auto"]["recorded"] == "fp32"
    pub = generate_keypair(tmp_path / "key")
    sign_bundle(bundle, tmp_path / "key")
    verify_bundle(bundle, pub)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["sizes"]["model.onnx"] += 1
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="changed after it was signed"):
        verify_bundle(bundle, pub)
    old = tmp_path / "old"  # exported before sizes were recorded: loads, and a runtime choice adds its own
    shutil.copytree(bundle, old)
    manifest.pop("sizes")
    (old / "manifest.json").write_text(json.dumps(manifest))
    Bundle.load(old)
    record_runtime_choice(old, {"variant": "fp32"})
    assert list(json.loads((old / "manifest.json").read_text())["sizes"]) == [RUNTIME_FILE]
    Bundle.load(old, variant="auto")
