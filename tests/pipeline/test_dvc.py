"""``roadwork dvc``: the file parses, mirrors the stage graph, and every stage's command runs in order."""

from __future__ import annotations

import os
import shlex
import warnings

import yaml

from roadwork.pipeline import STAGE_NAMES
from tests.conftest import tiny_overrides


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
