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
def test_predict_skips_an_unreadable_image_and_names_it(tiny_run, tmp_path, capsys):
    """JSON lines mode keeps going past a bad file, as out=DIR does: every good image predicted, the bad one
    named on stderr with its reason."""
    _, result = tiny_run
    good = sorted((result.run_dir / "data" / "images").glob("*.jpg"))[:2]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    assert main(["predict", str(result.bundle), str(good[0]), str(bad), str(good[1])]) == 0
    captured = capsys.readouterr()
    recs = [json.loads(line) for line in captured.out.splitlines()]
    assert [r["path"] for r in recs] == [str(good[0]), str(good[1])]
    assert "skipped " + str(bad) in captured.err and "1 of 3 entries skipped" in captured.err
    assert all(r["stage"] for r in recs)  # which stage answered, as the server says
    # nothing readable at all is an error, not an empty success
    assert main(["predict", str(result.bundle), str(bad)]) == 2
    assert "none of the 1 images could be read" in capsys.readouterr().err


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


# ------------------------------------------------------------------------------------- the one grammar


def test_every_command_of_the_specs_has_help_with_its_options_and_examples():
    from roadwork.cli import command_help
    from roadwork.cli.specs import COMMANDS

    for name, cmd in COMMANDS.items():
        text = command_help(name)
        assert text is not None and text.startswith(f"Usage: roadwork {name}"), name
        assert "Examples:" in text and f"roadwork {name.split()[0]}" in text.split("Examples:")[1], name
        assert all(f"  {o.name}=" in text for o in cmd.all_options()), name
        assert all(f.name in text for f in cmd.flags), name


def test_two_word_commands_answer_help(capsys):
    assert main(["data", "synthetic", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Usage: roadwork data synthetic out=DIR") and "label_noise=" in out
    assert main(["help", "data", "synthetic"]) == 0
    assert capsys.readouterr().out.startswith("Usage: roadwork data synthetic")
    assert main(["data", "--help"]) == 0  # the stage, then its sub-command
    out = capsys.readouterr().out
    assert out.startswith("Usage: roadwork data [CONFIG]") and "Usage: roadwork data synthetic" in out


def test_the_lists_the_specs_spell_out_match_the_code():
    from roadwork.cli.specs import FRAMEWORKS, _synthetic_options
    from roadwork.config import SyntheticConfig
    from roadwork.models.boosting import FRAMEWORKS as REAL

    assert FRAMEWORKS == REAL
    assert [o.name for o in _synthetic_options()] == list(SyntheticConfig.model_fields)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["predict", "b", "img.jpg", "engin=ray"], "unknown option 'engin'. Did you mean 'engine'?"),
        (["predict", "b"], "missing PATH"),
        (["predict", "b", "x.jpg", "engine=spark"], "engine='spark' is not one of local, ray."),
        (["predict", "b", "x.jpg", "batch=many"], "batch='many' is not a whole number."),
        (["bench", "b", "selct=true"], "Did you mean 'select'?"),
        (["bench", "b", "select=maybe"], "select='maybe' must be true or false."),
        (["monitor", "a", "b", "psi=high"], "psi='high' is not a number."),
        (["monitor", "a"], "missing CURRENT"),
        (["sweep", "demo", "trials=2"], "space= is required"),
        (["serve", "b", "prot=80"], "unknown option 'prot'. Did you mean 'port'?"),
        (["serve", "b", "port=-3"], "port=-3"),
        (["data", "synthetic", "n=10"], "out= is required"),
        (["data", "synthetic", "n=10", "sise=32", "out=x"], "Did you mean 'size'?"),
        (["run", "demo", "--froce", "train"], "unknown option '--froce'. Did you mean '--force'?"),
        (["run", "demo", "--until"], "--until needs a value"),
        (["run", "demo", "--until", "evalute"], "Unknown stage 'evalute'. Did you mean 'evaluate'?"),
        (["config", "shwo"], "unknown sub-command 'shwo'. Did you mean 'show'?"),
        (["config"], "roadwork config: needs a sub-command"),
        (["sign", "a", "b", "c"], "unexpected argument 'c'"),
        (["dvc", "demo", "extra"], "unexpected argument 'extra'"),
        (["compare", "demo", "frameworks=sklearn,gbm"], "frameworks=gbm is unknown; choose from sklearn"),
        (["serve", "b", "conformal_online=aci"], "learns from the labels sent to POST /v1/feedback"),
        (["label-next", "f.db", "n=0"], "n=0 lists nothing"),
        (["recertify", "b", "f.db", "labels=some"], "labels='some' is not one of audit, all"),
    ],
)
def test_usage_errors_name_the_option_value_and_fix_before_any_work(argv, message, capsys, tmp_path):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err
    if "roadwork config: needs" not in message and "sub-command" not in message:
        assert f"Usage: roadwork {argv[0]}" in err and "--help" in err  # the usage line, from the spec


def test_a_url_with_a_query_string_is_an_argument_not_an_option():
    from roadwork.cli.grammar import parse
    from roadwork.cli.specs import COMMANDS

    url = "postgresql://postgres@/postgres?host=/tmp/sock"
    parsed = parse(COMMANDS["label-next"], [url, "n=5"])
    assert parsed.positionals["STORE"] == url and parsed.options["n"] == 5


def test_parse_types_values_and_fills_defaults():
    from roadwork.cli.grammar import parse
    from roadwork.cli.specs import COMMANDS

    p = parse(COMMANDS["predict"], ["bundle", "a.jpg", "dir/", "batch=8", "engine=ray", "out=o"])
    assert p.positionals == {"BUNDLE": "bundle", "PATH": ["a.jpg", "dir/"]}
    assert p.options == {
        "out": "o",
        "engine": "ray",
        "batch": 8,
        "workers": 2,
        "device": "cpu",
        "require_signature": None,
    }
    assert p.given == {"batch", "engine", "out"}
    r = parse(COMMANDS["run"], ["demo", "train.epochs=3", "--force", "train", "--until=export"])
    assert (r.config, r.overrides, r.flags) == (
        "demo",
        ["train.epochs=3"],
        {"--force": ["train"], "--until": ["export"]},
    )
    s = parse(COMMANDS["sweep"], ["space=s.yaml", "trials=4", "name=x"])
    assert s.config is None and s.options["trials"] == 4 and s.overrides == ["name=x"]
    b = parse(COMMANDS["bench"], ["b", "select=yes", "seconds=0.5"])
    assert b.options["select"] is True and b.options["seconds"] == 0.5


def test_the_help_names_every_preset(capsys):
    """The preset list in the help is written out (help loads no config code); it must follow configs/."""
    from roadwork.config import preset_names

    assert main(["--help"]) == 0
    listed = capsys.readouterr().out.split("a preset (")[1].split(")")[0]
    assert set(listed.split(", ")) == set(preset_names())


def test_option_values_are_read_without_yaml_aliases_and_text_settings_stay_text():
    """A 300-byte alias bomb as an option value stays a short string (it expanded to gigabytes through
    yaml.safe_load); a host such as ``::`` or ``0`` is an address, not YAML."""
    from roadwork.cli.grammar import parse
    from roadwork.cli.specs import COMMANDS

    bomb = (
        "["
        + ",".join(
            ["&a [x,x,x,x,x,x,x,x,x]"]
            + [
                f"&{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]"
                for p, c in zip("abcdefgh", "bcdefghi", strict=True)
            ]
        )
        + "]"
    )
    p = parse(COMMANDS["serve"], ["b", "host=::", f"name={bomb}", "max_batch_size=8"])
    assert p.options["host"] == "::" and p.options["name"] == bomb and p.options["max_batch_size"] == 8
    assert parse(COMMANDS["serve"], ["b", "host=0"]).options["host"] == "0"
    s = parse(COMMANDS["data synthetic"], ["out=o", f"n={bomb}"])
    assert s.options["n"] == bomb  # the generator's settings then refuse it as not a number


def test_a_long_bad_setting_is_shown_shortened(capsys, tiny_run):
    assert main(["serve", str(tiny_run[1].bundle), "port=" + "9" * 5000]) == 2
    err = capsys.readouterr().err
    assert "port=" in err and "(5002 characters)" in err and len(err) < 2000, err
