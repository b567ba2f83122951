from __future__ import annotations

import json

import pytest

from roadwork.cli import main
from tests.conftest import tiny_overrides


def test_help_lists_commands_and_examples(capsys):
    assert main(["help"]) == 0
    out = capsys.readouterr().out
    assert "roadwork demo" in out and "Examples:" in out and "roadwork predict" in out


def test_unknown_command_suggests(capsys):
    assert main(["dmeo"]) == 2
    assert "Did you mean 'demo'?" in capsys.readouterr().err


def test_config_typo_fails_before_any_work(capsys, tmp_path):
    assert main(["run", "demo", f"root={tmp_path}", "train.epoch=3"]) == 2
    assert "Did you mean 'train.epochs'?" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing was written


def test_config_show_prints_resolved_values(capsys):
    assert main(["config", "show", "demo", "train.epochs=7"]) == 0
    assert "epochs: 7" in capsys.readouterr().out


def test_unknown_stage_is_named(capsys, tmp_path):
    assert main(["run", "demo", f"root={tmp_path}", "--force", "trian"]) == 2
    assert "Unknown stage 'trian'" in capsys.readouterr().err


def test_data_synthetic_writes_a_usable_manifest(tmp_path, capsys):
    out = tmp_path / "scenes"
    assert main(["data", "synthetic", "n=12", "size=32", f"out={out}", "workers=1"]) == 0
    lines = (out / "manifest.csv").read_text().splitlines()
    assert lines[0].startswith("path,label,weather") and len(lines) == 13


@pytest.mark.filterwarnings("ignore::roadwork.errors.RoadworkWarning")
def test_predict_prints_one_json_line_per_image(tiny_run, capsys):
    _, result = tiny_run
    images = sorted((result.run_dir / "data" / "images").glob("*.jpg"))[:3]
    assert main(["predict", str(result.bundle), *map(str, images)]) == 0
    recs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(recs) == 3
    assert set(recs[0]) == {"path", "label", "probability", "prediction_set", "abstain", "score", "stage"}


def test_predict_on_a_non_bundle_is_explained(tmp_path, capsys):
    assert main(["predict", str(tmp_path), str(tmp_path)]) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_tiny_overrides_are_valid():
    from roadwork.config import load_config

    assert load_config("demo", tiny_overrides("/tmp/x")).model.backbone == "test_resnet"


@pytest.mark.filterwarnings("ignore::roadwork.errors.RoadworkWarning")
def test_predict_on_an_unreadable_image_names_the_file(tiny_run, tmp_path, capsys):
    _, result = tiny_run
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    assert main(["predict", str(result.bundle), str(bad)]) == 2
    err = capsys.readouterr().err
    assert "Cannot read image" in err and "broken.jpg" in err
