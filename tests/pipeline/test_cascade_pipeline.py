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
            Predictions.from_parquet(
                run_dir / "cascade_models" / f"predictions-test-{st.name}.parquet"
            ).logits
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
    from roadwork.pipeline.artifacts import stage_outputs

    z_small = stage_outputs(result.run_dir / "cascade_models", policy.cascade.stages[0], "test")
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


def test_a_new_cascade_target_recertifies_without_retraining(tiny_run, tmp_path):
    import shutil

    from roadwork.pipeline import run_pipeline

    cfg, _ = tiny_run
    shutil.copytree(cfg.run_dir, tmp_path / cfg.name)
    cfg2 = cfg.model_copy(update={"root": str(tmp_path)}, deep=True)
    cfg2.cascade.target = 0.05
    res = run_pipeline(cfg2, progress=False)
    # the policy's thresholds are certified on the new cascade's outputs: they are refitted too (in seconds)
    assert {r.name for r in res.stages if not r.cached} == {
        "cascade",
        "conformal",
        "selective",
        "policy",
        "export",
        "evaluate",
    }
    assert json.loads((res.run_dir / "cascade" / "cascade.json").read_text())["target"] == 0.05


def test_certificate_holds_on_stored_predictions_over_many_draws(tiny_run):
    """The certificate on real stored outputs (the tiny run's three stages on calib ∪ test): 300 calibration
    draws with replacement from that pool — i.i.d. from its empirical distribution, so the pool's own risk is
    the population risk — exceed the target in at most δ plus three Monte Carlo standard errors."""
    import math
    import warnings

    from roadwork.errors import RoadworkWarning
    from roadwork.pipeline.artifacts import stage_outputs
    from roadwork.trust.calibration import calibrate_proba
    from roadwork.trust.cascade import cascade_curve, fit_cascade, gate_grid

    _, result = tiny_run
    run_dir = result.run_dir
    policy = TrustPolicy.load(run_dir / "policy" / "policy.json")
    c = Cascade.from_dict(json.loads((run_dir / "cascade" / "cascade.json").read_text()))
    probs, labels = [], []
    for split in ("calib", "test"):
        p = Predictions.from_parquet(run_dir / "predict" / f"predictions-{split}.parquet")
        early = [
            st.calibrator.predict_proba(stage_outputs(run_dir / "cascade_models", st, split))
            for st in c.stages[:-1]
        ]  # type: ignore[union-attr]
        probs.append([*early, calibrate_proba(policy.calibrator, p.logits, p.slices)])
        labels.append(p.labels)
    pool = [np.concatenate([probs[0][s], probs[1][s]]) for s in range(len(c.stages))]
    y = np.concatenate(labels)
    costs = [st.cost_ms for st in c.stages]
    grid = gate_grid(0.5)
    pop = cascade_curve(pool, y, costs, grid, "risk")
    target = float(np.quantile(pop["risk"], 0.5)) + 1e-9  # a target the grid crosses: a real choice
    risk_at = dict(zip(pop["threshold"].tolist(), pop["risk"].tolist(), strict=True))
    rng = np.random.default_rng(0)
    draws, delta, bad = 300, 0.2, 0
    for _ in range(draws):
        idx = rng.integers(0, len(y), len(y))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RoadworkWarning)
            fit = fit_cascade(
                c.stages, [p[idx] for p in pool], y[idx], mode="risk", target=target, delta=delta
            )
        if fit.certified:
            bad += risk_at[fit.threshold] > target
    assert bad / draws <= delta + 3 * math.sqrt(delta * (1 - delta) / draws)


def test_auto_cascade_is_off_where_its_gate_cannot_be_certified(tiny_run, tmp_path, capsys):
    """cascade.enabled=auto on the tiny run's 80 calibration rows: about 40 gate rows, where cascade.target=0.02
    needs 149 even with no disagreement. The model alone is served, every trust row certifies its policy, and the
    log and the warnings say why; the same data with a target its gate rows can certify keeps the cascade."""
    import shutil

    from roadwork.pipeline import run_pipeline
    from roadwork.trust.selective import rows_needed

    cfg, _ = tiny_run
    shutil.copytree(cfg.run_dir, tmp_path / cfg.name)
    auto = cfg.model_copy(update={"root": str(tmp_path)}, deep=True)
    auto.cascade.enabled = "auto"
    res = run_pipeline(auto, progress=False)
    spec = json.loads((res.run_dir / "cascade" / "cascade.json").read_text())
    assert spec["enabled"] is False and "cascade.enabled=auto" in spec["warnings"][0]
    stages = json.loads((res.run_dir / "cascade_models" / "stages.json").read_text())
    assert stages == {"enabled": False, "reason": stages["reason"]}  # decided before any stage was trained
    assert f"fewer than the {rows_needed(0.02, 0.05)} that cascade.target=0.02 needs" in spec["warnings"][0]
    assert "[cascade] off (cascade.enabled=auto)" in capsys.readouterr().out
    assert res.metrics["served"]["path"] == "model"
    assert any("cascade.enabled=auto" in w for w in res.metrics["warnings"])
    policy_rows = json.loads((res.run_dir / "policy" / "manifest.json").read_text())["info"]["n_policy_rows"]
    assert policy_rows == json.loads((res.run_dir / "calibrate" / "split.json").read_text())["n_trust"]
    auto.cascade.target = 0.3  # 9 rows suffice: the cascade stays
    res = run_pipeline(auto, progress=False)
    assert json.loads((res.run_dir / "cascade" / "cascade.json").read_text())["enabled"] is True
