"""ExPLoRA's pre-training step: it runs, its loss is finite, and it changes exactly what the recipe says."""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from roadwork.config import ModelConfig  # noqa: E402
from roadwork.errors import ConfigError, RoadworkWarning  # noqa: E402
from roadwork.training.explora import _backbone, explora_pretrain  # noqa: E402

CFG = ModelConfig(backbone="test_vit", image_size=32, kwargs={"img_size": 32})


def test_pretraining_changes_only_what_it_should() -> None:
    torch.manual_seed(0)
    init = {k: v.clone() for k, v in _backbone(CFG).state_dict().items()}
    u8 = np.random.default_rng(0).integers(0, 255, (24, 32, 32, 3), dtype=np.uint8)
    state, hist = explora_pretrain(
        CFG, u8, epochs=2, batch_size=12, init_state=init, unfreeze_last=1, lora_rank=4
    )
    assert len(hist) == 2 and all(np.isfinite(h["dino_loss"]) and np.isfinite(h["koleo"]) for h in hist)
    assert set(state) == set(init)  # merged: plain timm names, nothing added
    depth = max(int(k.split(".")[1]) for k in init if k.startswith("blocks.")) + 1
    changed = {k for k in init if not torch.equal(init[k], state[k])}
    last = f"blocks.{depth - 1}."
    for k in init:
        norm = ".norm" in k or k.startswith("norm.") or k.startswith("fc_norm")
        qkv_weight = k.endswith("attn.qkv.weight") and not k.startswith(last)
        should = k.startswith(last) or norm or qkv_weight
        if not should:
            assert k not in changed, f"{k} changed but is frozen in ExPLoRA"
    assert any(k.endswith("attn.qkv.weight") and not k.startswith(last) for k in changed)  # LoRA merged in
    assert any(k.startswith(last) and "mlp" in k for k in changed)  # the unfrozen block trained
    assert "pos_embed" not in changed and "patch_embed.proj.weight" not in changed


def test_needs_a_vit() -> None:
    with pytest.raises(ConfigError, match="ViT"):
        explora_pretrain(
            ModelConfig(backbone="test_resnet", image_size=32), np.zeros((4, 32, 32, 3), np.uint8)
        )


def test_train_stage_runs_the_recipe(tmp_path) -> None:
    import warnings

    from roadwork.config import SyntheticConfig, load_config
    from roadwork.data.synthetic import generate_dataset
    from roadwork.pipeline import run_pipeline
    from tests.conftest import tiny_overrides

    generate_dataset(
        tmp_path / "target", SyntheticConfig(n=24, seed=9, domain_b_fraction=1.0, workers=1), progress=False
    )
    over = {
        "model.backbone": "test_vit",
        "model.kwargs": "{img_size: 64}",
        "train.recipe": "explora",
        "train.unlabeled": str(tmp_path / "target"),
        "train.ssl_epochs": 1,
        "train.finetune": "lora",
        "cascade.enabled": False,
    }
    # one odd file never ends the run: a FIFO and a truncated JPEG among the unlabelled images are skipped
    os.mkfifo(tmp_path / "target" / "odd.jpg")
    first = next((tmp_path / "target").rglob("*.jpg"))
    (tmp_path / "target" / "cut.jpg").write_bytes(first.read_bytes()[:200])
    cfg = load_config(None, tiny_overrides(tmp_path / "runs", name="ex", **over))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = run_pipeline(cfg, progress=False, until="train")
    said = [str(w.message) for w in caught if "train.unlabeled are skipped" in str(w.message)]
    assert (
        len(said) == 1
        and said[0].startswith("explora: 2 of ")
        and "odd.jpg" in said[0]
        and "cut.jpg" in said[0]
    )
    train_dir = res.run_dir / "train"
    assert (train_dir / "explora-backbone.safetensors").is_file() and (
        train_dir / "explora-history.json"
    ).is_file()
    bad = load_config(
        None, tiny_overrides(tmp_path / "runs", name="ex2", **{**over, "train.unlabeled": "/nope"})
    )
    with pytest.raises(ConfigError, match="train.unlabeled"):
        run_pipeline(bad, progress=False, until="train")
    only_odd = tmp_path / "odd"
    only_odd.mkdir()
    os.mkfifo(only_odd / "a.jpg")
    none = load_config(
        None, tiny_overrides(tmp_path / "runs", name="ex3", **{**over, "train.unlabeled": str(only_odd)})
    )
    with pytest.warns(RoadworkWarning, match="1 of 1"), pytest.raises(ConfigError, match="no readable image"):
        run_pipeline(none, progress=False, until="train")
