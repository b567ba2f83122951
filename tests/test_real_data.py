"""A run on real photographs (../shared/data/real-roadwork-mini), skipped where the folder is absent."""

from __future__ import annotations

import warnings

import pytest

from roadwork.config import load_config
from roadwork.errors import RoadworkWarning
from roadwork.pipeline import run_pipeline
from tests.conftest import REAL_DATA, tiny_overrides

pytestmark = [
    pytest.mark.real_data,
    pytest.mark.skipif(not (REAL_DATA / "manifest.csv").is_file(), reason=f"{REAL_DATA} is absent"),
]


def test_trains_and_reports_on_real_photographs(tmp_path):
    cfg = load_config(
        "demo",
        tiny_overrides(
            tmp_path,
            name="real",
            **{
                "data.source": str(REAL_DATA / "manifest.csv"),
                "train.epochs": 3,
                "selective.target_risk": 0.2,
            },
        ),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RoadworkWarning)
        result = run_pipeline(cfg, progress=False)
    m = result.metrics
    assert m is not None
    assert m["test"]["n"] > 150
    assert (
        m["test"]["accuracy"] > 0.6
    )  # a 3-epoch tiny CNN at 64 px; a smoke test on real JPEGs, not a benchmark
    assert {"slice=test", "source=tracon"} <= {k.replace("slice.", "") for k in m["slices"]} | set(
        m["slices"]
    )
    assert result.report.is_file()
    report = (result.run_dir / "data" / "data_report.json").read_text()
    assert '"n_found": 1079' in report


def test_degenerate_outcomes_on_real_photographs_are_said_with_advice(tmp_path, capsys):
    """The default 2 % abstention target on a small model trained briefly on real photos: nothing can be
    certified. The CLI prints why and what to do, metrics.json lists it, the report shows it in a banner."""
    from roadwork.cli import main

    overrides = tiny_overrides(
        tmp_path, name="real-default", **{"data.source": str(REAL_DATA / "manifest.csv"), "train.epochs": 2}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RoadworkWarning)
        assert main(["run", "demo", *overrides]) == 0
    out = capsys.readouterr().out
    assert "warning:" in out
    assert "selective.target_risk" in out and "calibration" in out  # the advice, not just the symptom
    assert "hardest slices: \n" not in out
    run_dir = tmp_path / "real-default"
    import json

    metrics = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    assert metrics["warnings"] and any("selective.target_risk" in w for w in metrics["warnings"])
    html = (run_dir / "evaluate" / "report.html").read_text()
    assert "class='warnings'" in html
