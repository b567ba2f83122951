"""What is served is what is certified: metrics.json describes the exported bundle users run, every JSON file a
run writes is strict JSON, and policy.json follows its published schema."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from roadwork.errors import RoadworkWarning
from roadwork.export.bundle import Bundle
from roadwork.trust import Predictions

SCHEMA = Path(__file__).resolve().parents[2] / "docs" / "reference" / "policy.schema.json"


@pytest.fixture(scope="module")
def served_run(tmp_path_factory: pytest.TempPathFactory):
    """A tiny cascade run with targets loose enough that the gate lets earlier stages answer and abstention
    answers some images, plus miss-rate control: every figure the acceptance test compares is non-trivial."""
    from roadwork.config import load_config
    from roadwork.pipeline import run_pipeline
    from tests.conftest import tiny_overrides

    root = tmp_path_factory.mktemp("served")
    cfg = load_config(
        "demo",
        tiny_overrides(
            root,
            name="served",
            **{
                "data.synthetic.n": 600,
                "cascade.mode": "match",
                "cascade.target": 0.15,
                "cascade.small.gatekeeper_epochs": 0,
                "selective.target_risk": 0.8,
                "policy.max_miss_rate": 0.2,
            },
        ),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RoadworkWarning)
        return cfg, run_pipeline(cfg, progress=False)


def _served_records(result) -> tuple[list[dict], Predictions]:
    test = Predictions.from_parquet(result.run_dir / "predict" / "predictions-test.parquet")
    df = pd.read_parquet(result.run_dir / "data" / "dataset.parquet").set_index("id")
    paths = [str(result.run_dir / "data" / df.loc[i, "path"]) for i in test.ids]
    bundle = Bundle.load(result.bundle)
    slices = {c: list(v) for c, v in test.slices.items() if c in bundle.policy.slice_columns}
    return bundle.predict_paths(paths, batch_size=16, slices=slices or None), test


def test_every_figure_in_metrics_is_the_served_bundles(served_run):
    _, result = served_run
    m = result.metrics
    records, test = _served_records(result)
    y = np.array([test.classes[k] for k in test.labels])
    label = np.array([r["label"] for r in records])
    answered = ~np.array([r["abstain"] for r in records])
    covered = np.array([t in r["prediction_set"] for t, r in zip(y, records, strict=True)])
    assert m["test"]["accuracy"] == pytest.approx(float((label == y).mean()), abs=1e-12)
    assert m["conformal"]["coverage"] == pytest.approx(float(covered.mean()), abs=1e-12)
    sizes = [len(r["prediction_set"]) for r in records]
    assert m["conformal"]["mean_set_size"] == pytest.approx(float(np.mean(sizes)), abs=1e-12)
    assert m["selective"]["coverage"] == pytest.approx(float(answered.mean()), abs=1e-12)
    if answered.any():
        assert m["selective"]["risk"] == pytest.approx(
            float((label[answered] != y[answered]).mean()), abs=1e-12
        )
    else:
        assert m["selective"]["risk"] is None  # undefined, not 0
    pos = y == "roadwork"
    flagged = np.array([r["positive_possible"] for r in records])
    assert m["risk_control"]["test_miss_rate"] == pytest.approx(float((~flagged[pos]).mean()), abs=1e-12)
    stages = pd.Series([r["stage"] for r in records]).value_counts(normalize=True).to_dict()
    share = {k: v for k, v in m["served"]["stage_share"].items() if v > 0}
    assert share.keys() == stages.keys()
    for k, v in stages.items():
        assert share[k] == pytest.approx(v, abs=1e-12)
    assert m["cascade"]["stage_share"] == m["served"]["stage_share"]
    # the run is non-trivial: earlier stages answer, abstention answers some, the miss rate is measured
    assert stages.get("model", 0) < 1
    assert answered.mean() > 0
    assert pos.any()


def test_the_policy_is_certified_on_rows_the_gate_did_not_see(served_run):
    """The gate rows and the policy rows are disjoint, and the thresholds were fitted on the composite (the
    served path) on the policy rows: refitting them that way gives the same numbers."""
    from roadwork.pipeline.artifacts import load_calibrator, load_cascade
    from roadwork.pipeline.certify import fit_abstention, fit_conformal, row_split, served_probs
    from roadwork.trust import TrustPolicy

    cfg, result = served_run
    run = result.run_dir
    cal = Predictions.from_parquet(run / "predict" / "predictions-calib.parquet")
    split = row_split(cal.ids, 1.0, cfg.cascade.gate_fraction)
    assert not (split.gate & split.policy).any() and split.gate.any() and split.policy.any()
    spec = json.loads((run / "cascade" / "cascade.json").read_text())
    assert spec["rows"] == split.counts()
    cascade = load_cascade(run / "cascade")
    assert cascade is not None and len(cascade.stages) == 3 and math.isfinite(cascade.threshold)
    from roadwork.pipeline.artifacts import stage_outputs

    early = [stage_outputs(run / "cascade_models", st, "calib")[split.policy] for st in cascade.stages[:-1]]
    pol = cal.subset(split.policy)
    probs, stage = served_probs(load_calibrator(run / "calibrate"), cascade, early, pol.logits, pol.slices)
    assert stage is not None and (stage < 2).any()  # composite: earlier stages answer some policy rows
    policy = TrustPolicy.load(run / "policy" / "policy.json")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RoadworkWarning)
        assert fit_conformal(cfg.conformal, probs, pol).threshold_ == policy.conformal.threshold_
        assert fit_abstention(cfg.selective, probs, pol).threshold == policy.abstention.threshold
    assert policy.abstention.n == int(split.policy.sum())


def _strict(text: str) -> object:
    def refuse(c: str) -> object:
        raise ValueError(f"non-standard JSON constant {c}")

    return json.loads(text, parse_constant=refuse)


def test_every_json_file_a_run_writes_is_strict_json(served_run):
    _, result = served_run
    files = sorted(result.run_dir.rglob("*.json"))
    assert len(files) > 20
    for f in files:
        try:
            _strict(f.read_text())
        except ValueError as e:
            raise AssertionError(f"{f.relative_to(result.run_dir)}: {e}") from None


def test_policy_json_follows_the_published_schema(served_run, tiny_run):
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    for result in (served_run[1], tiny_run[1]):
        for name in ("policy.json",):
            policy = _strict((result.bundle / name).read_text())
            jsonschema.validate(policy, schema)
    # the tiny run certifies nothing: its null thresholds say so explicitly
    tiny = _strict((tiny_run[1].bundle / "policy.json").read_text())
    assert tiny["abstention"]["threshold"] is None and tiny["abstention"]["answers"] == "none"
    bad = dict(tiny, abstention=dict(tiny["abstention"], answers="maybe"))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_warnings_reach_metrics_the_cli_and_the_report(tiny_run, capsys):
    """The tiny run abstains on everything: metrics.json lists why, with advice, and the report shows it."""
    cfg, result = tiny_run
    warns = result.metrics["warnings"]
    assert any("answers 0 %" in w and "selective.target_risk" in w for w in warns)
    # how many rows the target needs: zero errors among n answered rows pass at delta once (1 - target)^n <= delta
    s = cfg.selective
    need = math.ceil(math.log(s.delta) / math.log(1 - s.target_risk))
    assert need == 59 and any(f"{need} answered rows" in w for w in warns)
    html = result.report.read_text()
    assert "class='warnings'" in html and "answers 0 %" in html
    from roadwork.cli.commands import print_summary

    print_summary(result)
    out = capsys.readouterr().out
    assert "warning:" in out and "answers 0 %" in out
    assert "hardest slices: \n" not in out


def test_slice_dependent_policies_report_bare_requests_beside_requests_with_metadata(served_run, tmp_path):
    """selective.group_by=weather: requests that carry the weather get their slice's threshold, bare ones (no
    metadata: roadwork predict on a folder, most HTTP clients) the global one. metrics.json reports both, and the
    bare figures are the bundle's own on requests without metadata."""
    import shutil

    from roadwork.pipeline import run_pipeline

    cfg, _ = served_run
    shutil.copytree(cfg.run_dir, tmp_path / cfg.name)
    sliced = cfg.model_copy(update={"root": str(tmp_path)}, deep=True)
    sliced.selective.group_by, sliced.selective.min_group_count = "weather", 10
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RoadworkWarning)
        res = run_pipeline(sliced, progress=False)
    kinds = res.metrics["request_kinds"]
    assert kinds["slice_columns"] == ["weather"]
    test = Predictions.from_parquet(res.run_dir / "predict" / "predictions-test.parquet")
    df = pd.read_parquet(res.run_dir / "data" / "dataset.parquet").set_index("id")
    paths = [str(res.run_dir / "data" / df.loc[i, "path"]) for i in test.ids]
    bare = Bundle.load(res.bundle).predict_paths(paths, batch_size=16)  # no metadata
    answered = ~np.array([r["abstain"] for r in bare])
    assert kinds["bare"]["answered"] == pytest.approx(float(answered.mean()), abs=1e-12)
    assert kinds["with_metadata"]["answered"] == pytest.approx(
        res.metrics["selective"]["coverage"], abs=1e-12
    )
    from roadwork.evaluation.report import summary_rows

    rows = dict(summary_rows(res.metrics))
    assert "bare requests (no metadata)" in rows and "requests with metadata (weather)" in rows
