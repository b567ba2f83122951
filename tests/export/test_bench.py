"""roadwork bench: every runtime × precision measured in one run, the fastest certified one within budget
selected, recorded in the bundle and served by variant=auto."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest

from roadwork.errors import ArtifactError, InputError, RoadworkWarning
from roadwork.export.bench import bench_bundle, bench_cli, format_table, select_variant
from roadwork.export.bundle import RUNTIME_FILE, Bundle, record_runtime_choice
from roadwork.export.runtime import openvino_available


def _row(variant, img_s, acc=0.9, ece=0.02, certified=True):  # type: ignore[no-untyped-def]
    return {
        "format": variant,
        "variant": variant,
        "img_s": img_s,
        "accuracy_change": acc - 0.9,
        "ece_change": ece - 0.02,
        "certified": certified,
    }


def test_selection_is_the_fastest_certified_variant_within_budget_never_slower_than_fp32():
    budget = {"max_accuracy_drop": 0.5, "max_ece_increase": 0.01}
    rows = [
        {"format": "torch eager", "variant": None, "img_s": 50.0},
        _row("fp32", 100.0, 0.9),
        _row("int8", 300.0, 0.89),  # -1 pt: over the budget
        _row("openvino-fp32", 150.0, 0.9),
        _row("openvino-bf16", 400.0, 0.898, certified=False),  # fastest and within budget, but uncertified
        _row("openvino-int8", 200.0, 0.9, ece=0.05),  # ECE over budget
    ]
    chosen = select_variant(rows, **budget)
    assert chosen["variant"] == "openvino-fp32" and chosen["selected"]
    by = {r["variant"]: r for r in rows}
    assert "accuracy -1.00 pt" in by["int8"]["note"] and "not selectable" in by["openvino-bf16"]["note"]
    assert "ECE +0.0300" in by["openvino-int8"]["note"] and not by["fp32"].get("note")
    assert sum(bool(r.get("selected")) for r in rows) == 1

    slow = [
        _row("fp32", 100.0),
        _row("int8", 20.0, 0.9),
    ]  # within budget but 5x slower: flagged, never chosen
    assert select_variant(slow, **budget)["variant"] == "fp32"
    assert "slower than ONNX fp32 (5.0x): never selected" in slow[1]["note"]
    unmeasured = [_row("fp32", 100.0), {**_row("int8", 300.0), "accuracy_change": None}]
    del unmeasured[1]["accuracy_change"]
    assert select_variant(unmeasured, **budget)["variant"] == "fp32"
    assert "pass images=" in unmeasured[1]["note"]


def test_bench_cli_explains_bad_options():
    with pytest.raises(InputError, match="Did you mean 'select'"):
        bench_cli(["bundle", "selct=true"])
    with pytest.raises(InputError, match="batch='x' is not a number"):
        bench_cli(["bundle", "batch=x"])
    with pytest.raises(InputError, match="Usage: roadwork bench BUNDLE"):
        bench_cli([])


@pytest.fixture(scope="module")
def ov_bundle(tiny_run, tmp_path_factory):
    if not openvino_available():
        pytest.skip("OpenVINO not installed (pip install 'roadwork[openvino]')")
    from roadwork.pipeline import run_pipeline

    cfg, _ = tiny_run
    tmp = tmp_path_factory.mktemp("bench")
    shutil.copytree(cfg.run_dir, tmp / cfg.name)
    cfg2 = cfg.model_copy(update={"root": str(tmp)}, deep=True)
    cfg2.export.int8 = "static"
    cfg2.export.int8_calibration_images = 32
    cfg2.export.openvino = True
    cfg2.export.max_accuracy_drop = 100.0  # a 2-epoch tiny model: let any certified variant qualify
    cfg2.export.max_ece_increase = 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RoadworkWarning)
        return run_pipeline(cfg2, progress=False).bundle


def test_export_certifies_each_openvino_variant_on_its_own_outputs(ov_bundle):
    from roadwork.export.runtime import bf16_supported

    manifest = json.loads((ov_bundle / "manifest.json").read_text())
    q = manifest["variants"]["openvino-int8"]  # NNCF post-training int8: an IR with its own policy
    assert (q["file"], q["runtime"], q["precision"], q["calibration_images"]) == (
        "model-openvino-int8.xml",
        "openvino",
        "int8",
        32,
    )
    assert {"model-openvino-int8.xml", "model-openvino-int8.bin", q["policy"]} <= set(manifest["files"])
    qb = Bundle.load(ov_bundle, variant="openvino-int8")
    assert qb.runtime["precision"] == "int8" and qb.runtime["inference_precision"] == "f32"
    v = manifest["variants"]["openvino-fp32"]
    assert (v["file"], v["runtime"], v["precision"]) == ("model.onnx", "openvino", "fp32")
    assert v["policy"] == "policy-openvino-fp32.json" and v["policy"] in manifest["files"]
    assert manifest["variants"]["int8"]["runtime"] == "onnxruntime"
    assert manifest["export"]["selection"] == {"max_accuracy_drop": 100.0, "max_ece_increase": 1.0}
    if not bf16_supported():
        assert "AVX-512 BF16" in manifest["export"]["variants_skipped"]["openvino-bf16"]
    b = Bundle.load(ov_bundle, variant="openvino-fp32", threads=1)
    assert b.runtime["runtime"] == "openvino" and b.runtime["threads"] == 1
    image = next((ov_bundle.parent.parent / "data" / "images").glob("*.jpg"))
    a, o = Bundle.load(ov_bundle).predict_paths([image])[0], b.predict_paths([image])[0]
    assert a["label"] == o["label"] and abs(a["probability"] - o["probability"]) < 1e-3


def test_bench_measures_every_runtime_selects_records_and_auto_serves_it(ov_bundle):
    rows = bench_bundle(str(ov_bundle), batch=2, seconds=0.2, rounds=2, select=True)
    by = {r["format"]: r for r in rows}
    assert rows.meta["images"].startswith("the run's val split")  # the selection never sees the test split
    for fmt in ("ONNX fp32", "ONNX int8", "OpenVINO fp32"):
        assert by[fmt]["status"] == "ok" and by[fmt]["img_s"] > 0 and 0 <= by[fmt]["ece"] <= 1
    assert by["OpenVINO fp32"]["max_diff"] <= 1e-4 and by["ONNX fp32"]["accuracy_change"] == 0
    assert by["torch eager"]["speedup"] == 1 and by["torch eager"]["status"] == "ok (trained weights)"
    # torch eager runs the trained weights: the model alone's accuracy is the exported fp32 model alone's
    assert by["torch eager"]["accuracy"] == pytest.approx(by["ONNX fp32"]["accuracy_model"], abs=0.02)
    assert by["ONNX fp32"]["quality_source"] == "served"  # variants are compared on what they serve
    chosen = [r for r in rows if r.get("selected")]
    assert len(chosen) == 1 and chosen[0]["variant"] == rows.meta["selected"]
    fp32 = by["ONNX fp32"]
    assert chosen[0]["img_s"] >= fp32["img_s"] and chosen[0].get("certified", True)
    for r in rows:
        if r.get("variant") and "img_s" in r and r["img_s"] < fp32["img_s"]:
            assert "never selected" in r["note"]
    table = format_table(rows)
    assert table.startswith("cpu: ") and f"selected: {rows.meta['selected']}" in table
    assert "| threads |" in table
    for fmt in ("torch eager", "ONNX fp32", "OpenVINO fp32"):
        assert by[fmt]["threads"] >= 1  # what each runtime really ran with (0 asked: its default)

    manifest = json.loads((ov_bundle / "manifest.json").read_text())
    assert RUNTIME_FILE in manifest["files"]
    rec = json.loads((ov_bundle / RUNTIME_FILE).read_text())
    assert rec["variant"] == rows.meta["selected"] and rec["batch"] == 2 and rec["cpu"]["model"]
    assert rec["threads"] == 0 and rec["threads_effective"] == chosen[0]["threads"] >= 1
    assert rec["measured"]["fp32"]["threads"] == fp32["threads"]
    auto = Bundle.load(ov_bundle, variant="auto")
    assert auto.variant == rec["variant"] and auto.runtime["auto"]["recorded"] == rec["variant"]
    policy_file = manifest["variants"].get(auto.variant, {}).get("policy", "policy.json")
    assert auto.policy.to_dict() == Bundle.load(ov_bundle, variant=auto.variant).policy.to_dict()
    assert (ov_bundle / policy_file).is_file()
    # what variant=auto serves, end to end on the test split, is in runtime.json and the run's metrics.json
    from roadwork.export.bench import served_test_figures

    again = served_test_figures(auto, auto.variant)
    assert again is not None and again["n"] > 0 and rec["served_test"] == again
    metrics = json.loads((ov_bundle.parent.parent / "evaluate" / "metrics.json").read_text())
    assert metrics["served_variant"] == auto.variant and metrics["variants"][auto.variant] == again
    evaluate_manifest = json.loads((ov_bundle.parent.parent / "evaluate" / "manifest.json").read_text())
    entry = evaluate_manifest["outputs"]["metrics.json"]
    assert entry["size"] == (ov_bundle.parent.parent / "evaluate" / "metrics.json").stat().st_size
    # the report and the model card say what variant=auto serves, with those same figures
    evaluate = ov_bundle.parent.parent / "evaluate"
    report, card = (evaluate / "report.html").read_text(), (evaluate / "MODEL_CARD.md").read_text()
    assert report.count("<section id='variants'>") == 1 and f"serves <b>{auto.variant}</b>" in report
    assert f"<td>{again['accuracy']:.4f}</td>" in report.split("<section id='variants'>")[1]
    line = next(x for x in card.splitlines() if x.startswith("- **Served variant:**"))
    assert f"`{auto.variant}`" in line and f"accuracy {again['accuracy']:.4f}" in line
    for name in ("report.html", "MODEL_CARD.md"):
        assert evaluate_manifest["outputs"][name]["size"] == (evaluate / name).stat().st_size


def test_runtime_choice_is_hashed_and_never_names_an_uncertified_variant(ov_bundle, monkeypatch):
    with pytest.raises(ArtifactError, match="no policy certified on its outputs"):
        record_runtime_choice(ov_bundle, {"variant": "openvino-int4"})
    record_runtime_choice(ov_bundle, {"variant": "openvino-fp32", "cpu": {"model": "x"}})
    assert Bundle.load(ov_bundle, variant="auto").runtime["runtime"] == "openvino"
    import roadwork.export.bundle as bundle_mod

    monkeypatch.setattr(bundle_mod, "runtime_status", lambda spec: "OpenVINO not installed")
    fallback = Bundle.load(ov_bundle, variant="auto")  # the recorded runtime cannot run here: fp32, said so
    assert fallback.variant == "fp32" and fallback.runtime["auto"]["reason"] == "OpenVINO not installed"
    monkeypatch.undo()
    f = ov_bundle / RUNTIME_FILE
    f.write_text(f.read_text().replace("openvino-fp32", "int8"))
    with pytest.raises(ArtifactError, match="runtime.json"):
        Bundle.load(ov_bundle, variant="auto")


@pytest.mark.parametrize("name", ["/proc/self/pagemap", "../model.onnx", "sub/model.onnx", None])
def test_a_variant_file_the_manifest_does_not_list_is_skipped_unopened(name):
    """bench opens variant files by path after the load: a name the manifest's files (checked plain names,
    hashed) do not list is never opened (a /proc file kept an unverified read going)."""
    from types import SimpleNamespace

    from roadwork.export.bench import _runtime_candidate, _variant_list

    manifest = {
        "files": {"model.onnx": "0", "policy.json": "0", "policy-int8.json": "0"},
        "variants": {"int8": {"file": name, "policy": "policy-int8.json"}},
    }
    bundle = SimpleNamespace(manifest=manifest, path=Path("/nonexistent"))
    variant = next(v for v in _variant_list(bundle) if v[0] == "int8")  # type: ignore[arg-type]
    row, candidate = _runtime_candidate(bundle, variant, SimpleNamespace(threads=0))  # type: ignore[arg-type]
    assert candidate is None and row["status"].startswith("skipped: the manifest does not list")
