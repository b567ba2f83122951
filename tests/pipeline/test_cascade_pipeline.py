"""The cascade end to end (the demo preset builds one): metrics, report, and the bundle answering exactly as
the in-process evaluation does."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from roadwork.evaluation.cascade import cascade_metrics
from roadwork.export.bundle import Bundle
from roadwork.trust import Predictions, TrustPolicy
from roadwork.trust.cascade import Cascade

pytestmark = pytest.mark.filterwarnings("ignore::roadwork.errors.RoadworkWarning")


def test_metrics_and_report_describe_the_cascade(tiny_run):
    _, result = tiny_run
    c = result.metrics["cascade"]
    for key in (
        "stages",
        "accuracy",
        "largest_stage_accuracy",
        "mean_cost_ms",
        "largest_stage_cost_ms",
        "cost_ratio",
        "stage_share",
    ):
        assert key in c
    assert [s["name"] for s in c["stages"]] == ["boost-sklearn", "small", "model"]
    assert all(s["cost_ms"] > 0 for s in c["stages"])
    assert abs(sum(c["stage_share"].values()) - 1) < 1e-9
    assert c["mean_cost_ms"] >= c["stages"][0]["cost_ms"]  # every image pays for the first stage
    assert any(k.startswith("weather=") for k in c["slices"])
    html = result.report.read_text()
    assert "<h2>Cascade</h2>" in html and 'id="fig-cascade"' in html
    spec = json.loads((result.run_dir / "cascade" / "cascade.json").read_text())
    assert [s["name"] for s in spec["all_stages"]] == ["boost-sklearn", "small", "model"]
    assert spec["candidates"] == []  # tiny runs keep all stages (cascade.select_stages=false)
    manifest = json.loads((result.bundle / "manifest.json").read_text())
    assert {"stage0-trees.json", "stage1-model.onnx", "stage1-model.json"} <= set(manifest["files"])


def _stage_logits(run_dir, policy: TrustPolicy, test: Predictions) -> list[np.ndarray]:
    return [
        *(
            Predictions.from_parquet(run_dir / "cascade" / f"predictions-test-{st.name}.parquet").logits
            for st in policy.cascade.stages[:-1]  # type: ignore[union-attr]
        ),
        test.logits,
    ]


def test_bundle_predict_and_evaluation_give_the_same_cascade_outputs(tiny_run):
    """A tiny model certifies nothing (every image would go to the last stage), so the gate is set by hand to
    the 40 % quantile of first-stage confidence: then earlier stages answer some test images."""
    _, result = tiny_run
    run_dir = result.run_dir
    test = Predictions.from_parquet(run_dir / "predict" / "predictions-test.parquet")
    bundle = Bundle.load(result.bundle)
    assert bundle.policy.cascade is not None
    policy = TrustPolicy.load(run_dir / "policy" / "policy.json")
    policy.cascade = Cascade.from_dict(json.loads((run_dir / "cascade" / "cascade.json").read_text()))
    logits = _stage_logits(run_dir, policy, test)
    first = policy.cascade.stages[0].calibrator.predict_proba(logits[0]).max(1)  # type: ignore[union-attr]
    policy.cascade.threshold = bundle.policy.cascade.threshold = float(np.quantile(first, 0.4))
    _, in_process = cascade_metrics(policy, logits, test, {})
    assert in_process.stage is not None and len(set(in_process.stage.tolist())) >= 2

    df = pd.read_parquet(run_dir / "data" / "dataset.parquet").set_index("id")
    paths = [str(run_dir / "data" / df.loc[i, "path"]) for i in test.ids]
    records = bundle.predict_paths(paths, batch_size=16)
    names = bundle.policy.cascade.names
    got_stage = np.array([names.index(r["stage"]) for r in records])
    np.testing.assert_array_equal(got_stage, in_process.stage)
    assert [r["label"] for r in records] == [test.classes[k] for k in in_process.pred]
    np.testing.assert_allclose([r["probability"] for r in records], in_process.confidence, atol=1e-4)
    assert [r["abstain"] for r in records] == in_process.abstain.tolist()


def test_cli_predict_reports_the_stage(tiny_run, capsys):
    from roadwork.cli import main

    _, result = tiny_run
    img = next((result.run_dir / "data" / "images").iterdir())
    assert main(["predict", str(result.bundle), str(img)]) == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rec["stage"] in ("boost-sklearn", "small", "model")


def test_learned_deferral_gate_end_to_end(tmp_path):
    """small (with a jointly trained gate) → model: the gate is the network's extra output, stored, exported
    and served; the bundle routes exactly as the evaluation does."""
    from roadwork.config import load_config
    from roadwork.pipeline import run_pipeline
    from tests.conftest import tiny_overrides

    cfg = load_config(
        "demo",
        tiny_overrides(
            tmp_path,
            name="gate",
            **{
                "cascade.boosting": "none",
                "cascade.small.deferral": "learned",
                "cascade.small.gatekeeper_epochs": 0,
            },
        ),
    )
    result = run_pipeline(cfg, progress=False)
    spec = json.loads((result.run_dir / "cascade" / "cascade.json").read_text())
    small = spec["stages"][0]
    assert small["name"] == "small" and small["info"]["gate"] is True
    card = json.loads((result.bundle / "stage0-model.json").read_text())
    assert card["gate"] is True
    bundle = Bundle.load(result.bundle)
    test = Predictions.from_parquet(result.run_dir / "predict" / "predictions-test.parquet")
    policy = TrustPolicy.load(result.run_dir / "policy" / "policy.json")
    policy.cascade = Cascade.from_dict(spec)
    from roadwork.pipeline.stages import _stage_outputs

    z_small = _stage_outputs(result.run_dir / "cascade", policy.cascade.stages[0], "test")
    assert z_small.shape == (len(test), 3)  # two classes and the gate
    gate = 1 / (1 + np.exp(-z_small[:, 2]))
    policy.cascade.threshold = bundle.policy.cascade.threshold = float(np.median(gate))
    _, in_process = cascade_metrics(policy, [z_small, test.logits], test, {})
    df = pd.read_parquet(result.run_dir / "data" / "dataset.parquet").set_index("id")
    records = bundle.predict_paths([str(result.run_dir / "data" / df.loc[i, "path"]) for i in test.ids])
    got = np.array([bundle.policy.cascade.names.index(r["stage"]) for r in records])
    np.testing.assert_array_equal(got, in_process.stage)
    assert 0 < (got == 0).mean() < 1
    assert result.metrics["cascade"]["stages"][0]["gate"] is True
