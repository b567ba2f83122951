"""End to end on a tiny configuration: caching, forcing, resuming, metrics schema, bundle parity."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from roadwork.config import load_config
from roadwork.pipeline import STAGE_NAMES, run_pipeline
from roadwork.pipeline import stages as stages_mod
from tests.conftest import tiny_overrides

# A 2-epoch model on 400 images cannot certify a low risk: the policy abstaining everywhere (with a
# RoadworkWarning) is the correct outcome there, not a failure of these tests.
pytestmark = pytest.mark.filterwarnings("ignore::roadwork.errors.RoadworkWarning")


def test_metrics_json_has_the_promised_keys(tiny_run):
    _, result = tiny_run
    m = result.metrics
    assert m is not None
    for k in ("n", "accuracy", "mcc", "auroc", "nll", "brier"):
        assert isinstance(m["test"][k], float | int)
    assert set(m["test"]["ece"]) >= {"uncalibrated", "calibrated"}
    assert set(m["conformal"]) >= {"method", "alpha", "coverage", "mean_set_size", "singleton_rate"}
    assert set(m["selective"]) >= {"target_risk", "delta", "coverage", "risk"}
    assert any(k.startswith("weather=") for k in m["slices"])
    assert all({"accuracy", "ece", "coverage"} <= set(v) for v in m["slices"].values())
    assert set(m["timing"]) >= set(STAGE_NAMES)
    assert m["export"]["parity_max_abs_diff"] <= 1e-4
    assert result.report.is_file() and (result.run_dir / "evaluate" / "MODEL_CARD.md").is_file()
    html = result.report.read_text()
    assert html.count("data:image/png;base64,") >= 4 and "Per-slice results" in html
    assert "Calibration methods" in html and {"none", "temperature", "isotonic"} <= set(
        m["calibration_comparison"]
    )
    lo, hi = m["test"]["ci95"]["accuracy"]
    assert lo <= m["test"]["accuracy"] <= hi


def test_second_run_is_all_cache_hits(tiny_run):
    cfg, _ = tiny_run
    again = run_pipeline(cfg, progress=False)
    assert [r.cached for r in again.stages] == [True] * len(STAGE_NAMES)


def _isolated(cfg, tmp_path):  # type: ignore[no-untyped-def]
    """A copy of the shared tiny run in its own root: tests that change it must not change it for others."""
    import shutil

    shutil.copytree(cfg.run_dir, tmp_path / cfg.name)
    return cfg.model_copy(update={"root": str(tmp_path)}, deep=True)


def test_force_reruns_the_stage_and_its_dependents_only(tiny_run, tmp_path):
    cfg = _isolated(tiny_run[0], tmp_path)
    res = run_pipeline(cfg, force=["conformal"], progress=False)
    ran = {r.name for r in res.stages if not r.cached}
    # the gate is certified on its own rows, before the policy: forcing conformal reruns neither cascade stage
    assert ran == {"conformal", "policy", "export", "evaluate"}


def test_changing_a_config_section_invalidates_only_downstream(tiny_run, tmp_path):
    cfg2 = _isolated(tiny_run[0], tmp_path)
    cfg2.selective.target_risk = 0.3
    res = run_pipeline(cfg2, progress=False)
    assert {r.name for r in res.stages if not r.cached} == {"selective", "policy", "export", "evaluate"}


def test_interrupted_run_resumes_and_leaves_no_partial_stage(tmp_path, monkeypatch):
    cfg = load_config("demo", tiny_overrides(tmp_path, name="crash", **{"train.epochs": 1}))

    def boom(ctx):
        (ctx.out / "half-written.json").write_text("{")
        raise KeyboardInterrupt

    stages = list(stages_mod.STAGES)
    idx = STAGE_NAMES.index("calibrate")
    monkeypatch.setattr(stages_mod, "STAGES", stages)
    import roadwork.pipeline as pipeline_mod

    crashing = [
        *stages[:idx],
        type(stages[idx])("calibrate", stages[idx].deps, stages[idx].config, boom),
        *stages[idx + 1 :],
    ]
    monkeypatch.setattr(pipeline_mod, "STAGES", crashing)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(cfg, progress=False)
    assert not (cfg.run_dir / "calibrate").exists()
    assert not list(cfg.run_dir.glob(".tmp-*"))
    monkeypatch.setattr(pipeline_mod, "STAGES", stages)
    res = run_pipeline(cfg, progress=False)
    cached = {r.name: r.cached for r in res.stages}
    assert cached["data"] and cached["train"] and cached["predict"] and not cached["calibrate"]


def test_a_second_run_on_a_busy_run_folder_is_refused_and_touches_nothing(tiny_run):
    from roadwork.errors import ConfigError
    from roadwork.pipeline.runner import run_folder_lock

    cfg, _ = tiny_run
    live = cfg.run_dir / ".tmp-train-99999"  # the first run's stage being written
    with run_folder_lock(cfg.run_dir):
        live.mkdir()
        try:
            with pytest.raises(
                ConfigError, match=r"is in use by another roadwork run \(pid \d+, since .*name="
            ):
                run_pipeline(cfg, progress=False)
            assert live.is_dir()  # the second run deleted nothing of the first's
        finally:
            live.rmdir()
    assert all(r.cached for r in run_pipeline(cfg, progress=False).stages)  # free again once released


def test_bundle_matches_the_in_process_pipeline_on_test(tiny_run):
    from roadwork.export.bundle import Bundle
    from roadwork.pipeline.artifacts import load_dataset, load_policy
    from roadwork.trust import Predictions

    _cfg, result = tiny_run
    bundle = Bundle.load(result.bundle)
    test = Predictions.from_parquet(result.run_dir / "predict" / "predictions-test.parquet")
    df, _ = load_dataset(result.run_dir / "data")
    paths = {i: str(result.run_dir / "data" / p) for i, p in zip(df["id"], df["path"], strict=True)}
    records = bundle.predict_paths([paths[i] for i in test.ids])
    inproc = load_policy(result.run_dir).apply(test.logits).records(test.classes)
    assert [r["label"] for r in records] == [r["label"] for r in inproc]
    assert [r["prediction_set"] for r in records] == [r["prediction_set"] for r in inproc]
    assert [r["abstain"] for r in records] == [r["abstain"] for r in inproc]
    assert np.allclose([r["probability"] for r in records], [r["probability"] for r in inproc], atol=1e-5)


def test_tampered_bundle_is_refused_naming_the_file(tiny_run, tmp_path):
    import shutil

    from roadwork.errors import ArtifactError
    from roadwork.export.bundle import Bundle

    _, result = tiny_run
    copy = tmp_path / "bundle"
    shutil.copytree(result.bundle, copy)
    policy = json.loads((copy / "policy.json").read_text())
    policy["abstention"]["threshold"] = 0.0
    (copy / "policy.json").write_text(json.dumps(policy))
    with pytest.raises(ArtifactError, match=r"bundle/policy\.json' does not match its sha256"):
        Bundle.load(copy)
    (copy / "model.onnx").unlink()
    with pytest.raises(ArtifactError, match="'model.onnx' is missing"):
        Bundle.load(copy)
    with pytest.raises(ArtifactError, match="no manifest.json"):
        Bundle.load(tmp_path)


def test_mlflow_run_was_logged(tiny_run):
    mlflow = pytest.importorskip("mlflow")
    cfg, result = tiny_run
    mlflow.set_tracking_uri(result.tracking_uri)
    runs = mlflow.search_runs(experiment_names=[cfg.tracking.experiment])
    assert len(runs) >= 1
    assert "metrics.test.accuracy" in runs.columns and "metrics.val_loss" in runs.columns


def test_a_folder_with_bad_files_runs_to_the_end_and_the_report_lists_them(messy_folder, tmp_path):
    cfg = load_config(
        "demo",
        tiny_overrides(
            tmp_path / "runs",
            name="messy",
            **{"data.source": str(messy_folder), "data.max_pixels": 4_000_000, "train.epochs": 1},
        ),
    )
    result = run_pipeline(cfg, progress=False)
    html = result.report.read_text()
    for name in (
        "roadwork/empty.jpg",
        "roadwork/truncated.jpg",
        "no_roadwork/notes.txt",
        "no_roadwork/bomb.png",
    ):
        assert name in html
    assert "zero-byte file" in html and "roadwork/dup_a.jpg, roadwork/dup_b.jpg" in html


def test_operating_point_and_risk_control_land_in_the_policy_the_bundle_and_the_metrics(tiny_run, tmp_path):
    from roadwork.export.bundle import Bundle

    cfg2 = _isolated(tiny_run[0], tmp_path)
    cfg2.policy.operating_point = "max_mcc"
    cfg2.policy.max_miss_rate = 0.2
    res = run_pipeline(cfg2, progress=False)
    # selective too: abstention is certified for the decision served, the operating point's
    assert {r.name for r in res.stages if not r.cached} == {"selective", "policy", "export", "evaluate"}
    m = res.metrics
    assert m is not None and m["operating_point"]["chosen"]["criterion"] == "max_mcc"
    bundle = Bundle.load(res.bundle)
    assert bundle.policy.operating_point is not None
    t = bundle.policy.operating_point.threshold
    assert bundle.policy.operating_point.remap(np.array([t]))[0] == 0.5
    assert m["risk_control"]["alpha"] == 0.2 and 0 <= m["risk_control"]["test_miss_rate"] <= 1
    image = next((res.run_dir / "data" / "images").glob("*.jpg"))
    assert "positive_possible" in bundle.predict_paths([image])[0]
    html = res.report.read_text()
    assert "Operating point of the score" in html and "Missed-positive risk control" in html


def test_per_slice_calibration_group_mondrian_and_label_noise_flow_into_policy_and_report(tiny_run, tmp_path):
    from roadwork.errors import ConfigError
    from roadwork.trust import TrustPolicy
    from roadwork.trust.calibration import SliceCalibrator

    cfg2 = _isolated(tiny_run[0], tmp_path)
    cfg2.calibrate.per_slice = "weather"
    cfg2.calibrate.min_slice_count = 10
    cfg2.conformal.group_by = "weather"
    cfg2.conformal.mondrian = "group"
    cfg2.conformal.label_noise = 0.05
    res = run_pipeline(cfg2, progress=False)
    policy = TrustPolicy.load(res.run_dir / "policy" / "policy.json")
    assert isinstance(policy.calibrator, SliceCalibrator) and policy.calibrator.per_value_
    assert policy.conformal.group_thresholds_ and policy.conformal.label_noise == 0.05
    assert policy.slice_columns == ["weather"]
    split = json.loads((res.run_dir / "calibrate" / "split.json").read_text())
    assert split["fit_fraction"] == 0.3  # a per-slice calibrator gets its own rows by default
    # the thresholds are fitted on the trust rows the cascade's gate did not use (the policy rows)
    rows = json.loads((res.run_dir / "cascade" / "cascade.json").read_text())["rows"]
    assert policy.conformal.n_ == rows["policy"] and rows["gate"] + rows["policy"] == split["n_trust"]
    assert split["n_calibrator"] > 20
    m = res.metrics
    assert m is not None
    methods = m["conformal_comparison"]["methods"]
    assert {"lac", "aps", "raps", "lac, Mondrian by class", "lac, Mondrian by weather"} <= set(methods)
    assert all(0 <= r["coverage"] <= 1 and r["worst_slice"] for r in methods.values())
    assert "Conformal methods" in res.report.read_text()
    # the bundle takes the same metadata: its records equal the policy applied with the test slices
    from roadwork.export.bundle import Bundle
    from roadwork.pipeline.artifacts import load_dataset
    from roadwork.trust import Predictions

    test = Predictions.from_parquet(res.run_dir / "predict" / "predictions-test.parquet")
    df, _ = load_dataset(res.run_dir / "data")
    where = {i: str(res.run_dir / "data" / p) for i, p in zip(df["id"], df["path"], strict=True)}
    records = Bundle.load(res.bundle).predict_paths(
        [where[i] for i in test.ids], batch_size=7, slices={"weather": test.slices["weather"]}
    )
    inproc = policy.apply(test.logits, test.slices).records(test.classes)
    assert [r["prediction_set"] for r in records] == [r["prediction_set"] for r in inproc]
    assert np.allclose([r["probability"] for r in records], [r["probability"] for r in inproc], atol=1e-5)
    cfg2.conformal.group_by = "season"  # not a column of the synthetic data
    with pytest.raises(ConfigError, match=r"conformal.group_by='season'.*weather"):
        run_pipeline(cfg2, progress=False)


def test_each_stage_hashes_only_the_code_it_runs():
    """Editing the report must not retrain the model; editing the training loop must."""
    from roadwork.pipeline.runner import code_files, code_version
    from roadwork.pipeline.stages import STAGES

    files = {s.name: {p.as_posix().split("/roadwork/", 1)[1] for p in code_files(s.code)} for s in STAGES}
    assert "training/loop.py" in files["train"] and "evaluation/report.py" not in files["train"]
    assert "evaluation/report.py" in files["evaluate"] and "training/loop.py" not in files["calibrate"]
    assert all("pipeline/stages.py" in f for f in files.values())
    assert code_version(STAGES[1].code) != code_version(STAGES[-1].code)


def test_int8_and_triton_exports_and_bench(tiny_run, tmp_path):
    from roadwork.errors import ConfigError
    from roadwork.export.bench import bench_bundle, format_table
    from roadwork.export.bundle import Bundle

    cfg2 = _isolated(tiny_run[0], tmp_path)
    cfg2.export.int8 = "static"
    cfg2.export.int8_calibration_images = 32
    cfg2.export.triton = True
    res = run_pipeline(cfg2, progress=False)
    manifest = json.loads((res.bundle / "manifest.json").read_text())
    q = manifest["variants"]["int8"]
    assert q["mode"] == "static" and q["file"] in manifest["files"] and q["test_n"] > 0
    assert abs(q["test_accuracy_change"]) <= 1 and 0 <= q["test_ece_int8"] <= 1
    fp32, int8 = Bundle.load(res.bundle), Bundle.load(res.bundle, variant="int8")
    image = next((res.run_dir / "data" / "images").glob("*.jpg"))
    a, b = fp32.predict_paths([image])[0], int8.predict_paths([image])[0]
    assert set(a) == set(b) and abs(a["probability"] - b["probability"]) < 0.2  # same policy, int8 weights
    with pytest.raises(Exception, match="no 'fp16' model"):
        Bundle.load(res.bundle, variant="fp16")
    # tensors (/v2, Triton) get the model alone's certified policy, each variant its own
    assert q["model_policy"] == "policy-model-int8.json" and q["model_policy"] in manifest["files"]
    assert int8.model_policy is not None and int8.model_policy.cascade is None
    assert fp32.model_policy is not None and fp32.tensor_policy is fp32.model_policy
    repo_policy = (res.run_dir / "export" / "triton" / cfg2.name / "policy.json").read_text()
    assert repo_policy == (res.bundle / "policy-model.json").read_text()
    config = (res.run_dir / "export" / "triton" / cfg2.name / "config.pbtxt").read_text()
    assert 'name: "input"' in config and "dims: [ 3, 64, 64 ]" in config and "dynamic_batching" in config
    assert (res.run_dir / "export" / "triton" / cfg2.name / "1" / "model.onnx").is_file()
    rows = bench_bundle(str(res.bundle), batch=2, seconds=0.2)
    by = {r["format"]: r for r in rows}
    assert (
        by["ONNX int8"]["status"] == "ok"
        and by["ONNX fp32"]["img_s"] > 0
        and by["torch eager"]["speedup"] == 1
    )
    assert re.search(r"\| (\*\*)?ONNX int8(\*\*)?( ✓)? \| ok \|", format_table(rows))  # ✓: the selected one
    cfg2.export.tensorrt = True
    with pytest.raises(ConfigError, match="TensorRT"):
        run_pipeline(cfg2, progress=False)


def test_lora_training_merges_before_save_and_exports_with_parity(tiny_run, tmp_path):
    cfg2 = _isolated(tiny_run[0], tmp_path)
    cfg2.train.finetune = "lora"
    cfg2.train.lora_rank = 4
    cfg2.train.accumulate = 2
    res = run_pipeline(cfg2, progress=False)
    train = json.loads((res.run_dir / "train" / "manifest.json").read_text())["info"]
    total = json.loads((tiny_run[1].run_dir / "train" / "manifest.json").read_text())["info"][
        "trainable_params"
    ]
    assert train["finetune"] == "lora" and 0 < train["trainable_params"] < total
    export = json.loads((res.bundle / "manifest.json").read_text())["export"]
    assert export["parity_max_abs_diff"] <= 1e-4  # the merged plain model is what was exported


def test_training_interrupted_mid_stage_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    """Ctrl-C after epoch 1 of 2: the next run continues at epoch 2 and ends where an uninterrupted run ends."""
    import roadwork.training.loop as loop

    cfg = load_config(
        "demo", tiny_overrides(tmp_path, name="resume", **{"train.epochs": 2, "tracking.enabled": False})
    )
    real = loop.train_model

    def interrupted(*a, **kw):  # type: ignore[no-untyped-def]
        def stop(epoch, row):  # type: ignore[no-untyped-def]
            if epoch == 1:
                raise KeyboardInterrupt

        return real(*a, **{**kw, "on_epoch": stop})

    monkeypatch.setattr(loop, "train_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(cfg, progress=False)
    assert list((cfg.run_dir / "checkpoints").glob("train-*/state.json"))
    monkeypatch.setattr(loop, "train_model", real)
    resumed = run_pipeline(cfg, progress=False)
    history = json.loads((resumed.run_dir / "train" / "history.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2] and not list((cfg.run_dir / "checkpoints").glob("train-*"))
    other = load_config(
        "demo", tiny_overrides(tmp_path, name="straight", **{"train.epochs": 2, "tracking.enabled": False})
    )
    straight = json.loads(
        (run_pipeline(other, progress=False).run_dir / "train" / "history.json").read_text()
    )
    assert [r["train_loss"] for r in history] == [r["train_loss"] for r in straight]
