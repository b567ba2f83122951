"""The fine-tuning presets: they load, say what they are in a comment block, and build at their image size."""

from __future__ import annotations

from importlib import resources

import pytest

from roadwork.config import load_config, preset_names

FINETUNE = ["finetune-gpu", "finetune-cpu"]


@pytest.mark.parametrize("name", FINETUNE)
def test_finetune_presets_load_with_a_comment_block(name: str) -> None:
    assert name in preset_names()
    text = resources.files("roadwork.configs").joinpath(f"{name}.yaml").read_text()
    comments = [line for line in text.splitlines() if line.startswith("#")]
    assert comments[0].startswith(f"# {name} — ") and len(comments) >= 6
    assert f"roadwork run {name} data.source=" in text and "model.weights=" in text
    cfg = load_config(name, ["data.source=photos"])
    assert cfg.name == name and cfg.model.pretrained and cfg.train.augment == "standard"
    assert cfg.model.image_size >= 160


def test_the_gpu_preset_is_the_lora_recipe_at_224() -> None:
    cfg = load_config("finetune-gpu")
    assert cfg.model.backbone.startswith("vit_small_patch14_dinov2")
    assert (cfg.model.image_size, cfg.model.kwargs["img_size"]) == (
        224,
        224,
    )  # timm's DINOv2 is built for 518
    assert (cfg.train.finetune, cfg.train.precision, cfg.train.ema) == ("lora", "bf16-mixed", 0.999)


def test_the_cpu_preset_builds_and_runs_at_its_size() -> None:
    torch = pytest.importorskip("torch")
    from roadwork.models.factory import create_model

    cfg = load_config("finetune-cpu", ["model.pretrained=false"])  # no hub in tests
    net, spec = create_model(cfg.model, 2)
    assert spec.size == cfg.model.image_size == 192
    with torch.inference_mode():
        assert net.eval()(torch.zeros(1, 3, 192, 192)).shape == (1, 2)
