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


def test_stage_commands_match_the_pipeline():
    from roadwork.cli import STAGES
    from roadwork.pipeline import STAGE_NAMES

    assert list(STAGES) == STAGE_NAMES


@pytest.mark.parametrize(
    "cmd", ["demo", "run", "config", "data", "predict", "serve", "sweep", "dvc", "train"]
)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_every_command_answers_help_with_its_usage_and_examples(cmd, flag, capsys):
    assert main([cmd, flag]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Usage: roadwork ") and f"roadwork {cmd}" in out.split("Examples:")[1]


def test_help_for_every_command_in_the_overview(capsys):
    from roadwork.cli import commands

    for cmd in commands():
        assert main(["help", cmd]) == 0, cmd
        assert f"roadwork {cmd}" in capsys.readouterr().out, cmd


def test_serve_help_is_help_not_a_bundle_path(capsys):
    assert main(["serve", "--help"]) == 0
    captured = capsys.readouterr()
    assert "not a roadwork bundle" not in captured.err and "max_batch_size" in captured.out


def test_misspelt_command_suggests_sweep(capsys):
    assert main(["swep"]) == 2
    assert "Did you mean 'sweep'?" in capsys.readouterr().err


def test_nested_config_typo_suggests_the_full_key(capsys, tmp_path):
    assert main(["run", "demo", f"root={tmp_path}", "cascade.small.deferal=learned"]) == 2
    assert "Did you mean 'cascade.small.deferral'?" in capsys.readouterr().err


def test_run_with_out_says_use_root_and_name(capsys, tmp_path):
    assert main(["run", "demo", f"out={tmp_path / 'x'}"]) == 2
    err = capsys.readouterr().err
    assert "use root= and name=" in err.lower() and not (tmp_path / "x").exists()


def test_sweep_engine_ray_calls_ray_tune(monkeypatch, tmp_path, capsys):
    import roadwork.scale.sweep as sweep

    calls = []

    def fake(name):
        def run(cfg, space, **kw):
            calls.append((name, kw))
            return {"best": {"value": 0.5, "params": {}}, "trials": [], "dir": str(tmp_path)}

        return run

    monkeypatch.setattr(sweep, "run_sweep", fake("optuna"))
    monkeypatch.setattr(sweep, "run_sweep_ray", fake("ray"))
    space = tmp_path / "space.yaml"
    space.write_text("train.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n")
    base = ["sweep", "demo", f"root={tmp_path}", f"space={space}", "trials=2"]
    assert main([*base, "engine=ray"]) == 0
    assert main(base) == 0
    assert [c[0] for c in calls] == ["ray", "optuna"]
    assert main([*base, "engine=dask"]) == 2
    assert "engine='dask'" in capsys.readouterr().err


def test_help_imports_nothing_heavy():
    import subprocess
    import sys

    code = (
        "import sys; from roadwork.cli import main; main(['help']); main(['run', '--help']); "
        "print(sorted(m for m in ('numba', 'pandas', 'pydantic', 'torch') if m in sys.modules), file=sys.stderr)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stderr.strip() == "[]"


def test_serve_help_names_every_setting(capsys):
    from roadwork.serve.settings import ServeSettings

    assert main(["serve", "--help"]) == 0
    out = capsys.readouterr().out
    assert all(k in out for k in ServeSettings.model_fields if k != "api_key")
