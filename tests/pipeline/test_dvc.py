"""``roadwork dvc``: the file parses, mirrors the stage graph, and every stage's command runs in order."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from roadwork.pipeline import STAGE_NAMES
from tests.conftest import tiny_overrides


def _dvc() -> str | None:
    return shutil.which("dvc", path=str(Path(sys.executable).parent)) or shutil.which("dvc")


@pytest.mark.skipif(_dvc() is not None, reason="test_dvc_repro_twice runs every command through dvc itself")
def test_every_dvc_stage_command_runs(tmp_path, capsys):
    from roadwork.cli import main

    root = tmp_path / "runs"
    args = ["dvc", "demo", *tiny_overrides(root, name="dvc"), "cascade.enabled=false", f"out={tmp_path}"]
    assert main(args) == 0
    spec = yaml.safe_load((tmp_path / "dvc.yaml").read_text())["stages"]
    assert list(spec) == STAGE_NAMES
    assert spec["train"]["deps"] == [f"{root}/dvc/data"] and spec["train"]["outs"] == [f"{root}/dvc/train"]
    assert {"model", "train"} <= set(spec["train"]["params"][0]["roadwork.yaml"])
    params = yaml.safe_load((tmp_path / "roadwork.yaml").read_text())
    assert params["name"] == "dvc" and params["cascade"]["enabled"] is False
    cwd = os.getcwd()
    os.chdir(tmp_path)  # DVC runs commands from the folder holding dvc.yaml
    try:
        for name in STAGE_NAMES:  # in the file's order, as dvc repro would (each dep exists before its use)
            cmd = shlex.split(spec[name]["cmd"])
            assert cmd == ["roadwork", "run", "roadwork.yaml", "--until", name]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                assert main(cmd[1:]) == 0, name
            for out in spec[name]["outs"]:
                assert (tmp_path / out).is_dir() or os.path.isdir(out), out
    finally:
        os.chdir(cwd)


def test_stages_depend_on_the_source_they_run_and_name_metrics_and_plots(tmp_path):
    from roadwork.config import load_config
    from roadwork.pipeline.dvc import dvc_stages

    repo = Path(__file__).resolve().parents[2]
    spec = dvc_stages(load_config("demo", [f"root={tmp_path}"]), base=repo)
    deps = {name: set(st["deps"]) for name, st in spec["stages"].items()}
    assert "src/roadwork/training/loop.py" in deps["train"]  # a checkout: relative to dvc.yaml's folder
    assert "src/roadwork/evaluation/report.py" in deps["evaluate"]
    assert "src/roadwork/evaluation/report.py" not in deps["train"]  # editing the report retrains nothing
    assert all(Path(repo, d).is_file() for d in deps["train"] if d.startswith("src/"))
    assert not any("__pycache__" in d for ds in deps.values() for d in ds)
    elsewhere = dvc_stages(load_config("demo", [f"root={tmp_path}"]), base=tmp_path)  # an installed roadwork
    assert all(Path(d).is_absolute() for d in elsewhere["stages"]["train"]["deps"] if d.endswith(".py"))
    assert spec["metrics"] == [f"{tmp_path}/demo/evaluate/metrics.json"]
    plotted = [next(iter(p)) if isinstance(p, dict) else p for p in spec["plots"]]
    assert plotted == [
        f"{tmp_path}/demo/{f}" for f in ("train/history.json", "evaluate/slices.csv", "evaluate/figures")
    ]


@pytest.mark.skipif(_dvc() is None, reason="dvc not installed (the dev extra has it)")
def test_dvc_repro_twice_reruns_nothing_and_shows_metrics_and_plots(tmp_path):
    """dvc itself: repro runs every stage; a second repro runs none; metrics show and plots find the files."""
    from roadwork.cli import main

    dvc = _dvc()
    assert dvc is not None
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.update(DVC_NO_ANALYTICS="1", DVC_NO_UPDATER="1")

    def run(*args: str) -> str:
        res = subprocess.run([dvc, *args], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert res.returncode == 0, res.stdout + res.stderr
        return res.stdout

    run("init", "--no-scm", "-q")
    args = ["dvc", "demo", *tiny_overrides("runs", name="dvc"), "cascade.enabled=false", f"out={tmp_path}"]
    cwd = os.getcwd()
    os.chdir(tmp_path)  # root=runs: the run folder is relative to dvc.yaml's folder
    try:
        assert main(args) == 0
    finally:
        os.chdir(cwd)
    # The source deps point at a snapshot of the package: the same files, but edits made to the working tree
    # while this test runs (other work in the checkout) cannot rerun stages, and the test can edit one itself.
    import roadwork

    package = Path(roadwork.__file__).resolve().parent
    snapshot = tmp_path / "src" / "roadwork"
    shutil.copytree(package, snapshot, ignore=shutil.ignore_patterns("__pycache__"))
    spec = yaml.safe_load((tmp_path / "dvc.yaml").read_text())
    for stage in spec["stages"].values():
        stage["deps"] = [
            str(snapshot / Path(d).relative_to(package)) if d.startswith(str(package)) else d
            for d in stage["deps"]
        ]
    assert any(d.startswith(str(snapshot)) for d in spec["stages"]["train"]["deps"])
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))

    first = run("repro")
    assert all(f"Running stage '{name}'" in first for name in STAGE_NAMES), first
    second = run("repro")
    assert "Running stage" not in second, second + run("status")  # (status: which dep or out changed)
    with open(snapshot / "evaluation" / "report.py", "a") as f:  # a report edit: only evaluate is stale
        f.write("\n# edited\n")
    assert set(json.loads(run("status", "--json"))) == {"evaluate"}
    metrics = run("metrics", "show", "--json")
    assert '"accuracy"' in metrics
    shown = run("plots", "show", "--json")
    for f in ("train/history.json", "evaluate/slices.csv", "evaluate/figures"):
        assert f"runs/dvc/{f}" in shown, f
