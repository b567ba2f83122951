"""Own photos with no model named: the pretrained recipe, and an offline machine told so in seconds."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from roadwork.config import load_config
from roadwork.errors import ConfigError
from roadwork.training.recipes import default_recipe


def test_own_photos_without_a_model_get_the_pretrained_recipe() -> None:
    assert default_recipe(None, ["data.source=photos"], cuda=False)[0] == "finetune-cpu"
    preset, line = default_recipe(None, ["data.source=photos", "train.epochs=3"], cuda=True)
    assert preset == "finetune-gpu" and "finetune-gpu" in line and "pretrained recipe" in line
    # local weights of the same backbone keep the recipe
    assert default_recipe(None, ["data.source=photos", "model.weights=w.safetensors"], cuda=True)[0] == (
        "finetune-gpu"
    )


@pytest.mark.parametrize("cuda", [False, True])
def test_own_photos_without_pretrained_weights_get_the_scratch_recipe(cuda: bool) -> None:
    """A fine-tuning recipe from random weights stays at chance on small sets: no weights, the scratch recipe."""
    preset, line = default_recipe(None, ["data.source=photos", "model.pretrained=false"], cuda=cuda)
    assert preset == "scratch" and "from-scratch recipe scratch" in line
    cfg = load_config(preset, ["data.source=photos", "model.pretrained=false"])
    assert (cfg.model.backbone, cfg.model.pretrained, cfg.cascade.enabled) == ("resnet10t", False, False)
    # weights given as well: they are pretrained weights, the fine-tuning recipe uses them
    both = ["data.source=photos", "model.pretrained=false", "model.weights=w.safetensors"]
    assert default_recipe(None, both, cuda=cuda)[0] in ("finetune-cpu", "finetune-gpu")


def _config_of_run(monkeypatch: pytest.MonkeyPatch, args: list[str]) -> str:
    """The configuration `roadwork run ARGS` hands to the pipeline (stopped there), as config show prints it."""
    import roadwork.pipeline
    from roadwork.cli import main
    from roadwork.config import dump_config

    seen = []

    def stop(cfg: object, **kw: object) -> None:
        seen.append(cfg)
        raise SystemExit(0)

    monkeypatch.setattr(roadwork.pipeline, "run_pipeline", stop)
    with pytest.raises(SystemExit):
        main(["run", *args])
    return dump_config(seen[0]).rstrip()  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "args",
    [
        ["model.pretrained=false"],  # no weights: the scratch recipe
        ["model.weights=WEIGHTS"],  # local weights: the fine-tuning recipe with them
        ["finetune-cpu", "model.pretrained=false"],  # a recipe named: kept (with a warning)
        ["demo", "model.pretrained=false"],
    ],
)
def test_config_show_prints_what_run_trains_for_a_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    from roadwork.cli import main

    photos = _photos(tmp_path / "photos")
    (tmp_path / "w.safetensors").write_bytes(b"")
    args = [a.replace("WEIGHTS", str(tmp_path / "w.safetensors")) for a in args]
    args += [f"data.source={photos}", f"root={tmp_path / 'runs'}"]
    assert main(["config", "show", *args]) == 0
    shown = capsys.readouterr()
    ran = _config_of_run(monkeypatch, args)
    assert shown.out.strip() == ran
    said = capsys.readouterr().err
    assert shown.err == said  # the same lines on stderr about the choice
    if args[0] == "model.pretrained=false":
        assert "backbone: resnet10t" in ran and "using the from-scratch recipe scratch" in said
    if args[0] == "finetune-cpu":
        assert "convnext_atto" in ran and "roadwork run scratch" in said


@pytest.mark.parametrize(
    "config, overrides",
    [
        ("demo", ["data.source=photos"]),  # a CONFIG named
        (None, []),  # the generated scenes
        (None, ["data.source=synthetic"]),
        (None, ["data.source=photos", "model.backbone=resnet10t"]),  # a model named
    ],
)
def test_no_recipe_is_imposed_when_the_user_chose(config: str | None, overrides: list[str]) -> None:
    assert default_recipe(config, overrides, cuda=False) is None


def test_the_hub_check_passes_without_asking_when_no_hub_weights_are_needed() -> None:
    from roadwork.models.hub import check_pretrained, hub_file

    assert check_pretrained(load_config("demo").model) == "not needed"
    assert (
        check_pretrained(load_config("finetune-cpu", ["model.weights=w.safetensors"]).model) == "not needed"
    )
    assert hub_file("convnext_atto.d2_in1k").repo_id == "timm/convnext_atto.d2_in1k"
    assert hub_file("hf:facebook/dinov2-small").repo_id == "facebook/dinov2-small"
    assert hub_file("hf:dinov2") is None  # a model type: random weights from a config


def test_offline_mode_fails_without_a_request(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from roadwork.models import hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "_cached", lambda f: False)

    def no_request(*a: object, **k: object) -> None:
        raise AssertionError("a request was made with HF_HUB_OFFLINE=1")

    monkeypatch.setattr("huggingface_hub.get_hf_file_metadata", no_request)
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE") as e:
        hub.check_pretrained(load_config("finetune-cpu").model)
    assert "model.weights=FILE" in str(e.value) and "model.pretrained=false" in str(e.value)


def _photos(root: Path) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("roadwork", "clear"):
        (root / cls).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(root / cls / f"{i}.jpg")
    return root


def _roadwork() -> list[str]:
    script = Path(sys.executable).with_name("roadwork")  # the console script users type
    return [str(script)] if script.is_file() else [sys.executable, "-m", "roadwork.cli"]


@pytest.mark.parametrize("offline_env", ["unreachable hub", "HF_HUB_OFFLINE=1"])
def test_roadwork_run_on_photos_offline_fails_at_once_with_the_fixes(
    tmp_path: Path, offline_env: str
) -> None:
    """The CLI end to end, as a user types it, with no network: the hub endpoint refuses connections (port 9 on
    localhost), or HF_HUB_OFFLINE=1; an empty hub cache. Timed, printed, not asserted (a loaded CI machine)."""
    photos = _photos(tmp_path / "photos")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("TRANSFORMERS_OFFLINE", None)
    if offline_env == "HF_HUB_OFFLINE=1":
        env["HF_HUB_OFFLINE"] = "1"
    t0 = time.perf_counter()
    res = subprocess.run(
        [*_roadwork(), "run", f"data.source={photos}", f"root={tmp_path / 'runs'}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    seconds = time.perf_counter() - t0
    print(
        f"\n[{offline_env}] roadwork run data.source=FOLDER failed in {seconds:.2f} s (exit {res.returncode})"
    )
    assert res.returncode != 0
    assert "using the pretrained recipe finetune-cpu" in res.stderr
    assert "model.weights=FILE" in res.stderr and "model.pretrained=false" in res.stderr
    # the command that trains without the hub, ready to paste
    assert f"roadwork run data.source={photos} root={tmp_path / 'runs'} model.pretrained=false" in res.stderr
    assert "Retrying" not in res.stderr  # no backoff against the hub
    assert not (tmp_path / "runs" / "finetune-cpu" / "data").exists()  # before any stage ran
