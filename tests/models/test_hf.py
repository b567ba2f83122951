"""Hugging Face transformers backbones (hf:...): tiny random configs, no hub."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from roadwork.config import ModelConfig  # noqa: E402
from roadwork.errors import ConfigError  # noqa: E402
from roadwork.models.adapters import count_trainable, merge_adapters, prepare_finetune  # noqa: E402
from roadwork.models.factory import ModelCard, card_kwargs, create_model, load_model, save_model  # noqa: E402

TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "image_size": 32,
    "patch_size": 8,
}


@pytest.mark.parametrize("kind", ["dinov2", "dinov3_vit", "dinov2_with_registers"])
def test_hf_backbone_trains_with_lora_merges_and_round_trips(tmp_path, kind):
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=f"hf:{kind}", image_size=32, kwargs=TINY, pretrained=False)
    model, spec = create_model(cfg, 2)
    assert spec.size == 32 and model.pooling == "cls+mean"
    assert model.prefix == 1 + (4 if kind == "dinov2_with_registers" else 0)
    head = sum(p.numel() for p in model.get_classifier().parameters())
    qv = [n for n, _ in model.named_modules() if n.endswith(("attention.q_proj", "attention.v_proj"))]
    assert len(qv) == 4  # q and v of two layers
    peft_model = prepare_finetune(model, "lora", rank=4, alpha=8)
    assert count_trainable(peft_model) == 4 * 4 * (32 + 32) + head
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 2, (8,), generator=g)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(15):
        loss = torch.nn.functional.cross_entropy(peft_model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    peft_model.eval()
    with torch.no_grad():
        adapted = peft_model(x)
        merged = merge_adapters(peft_model).eval()
        assert torch.allclose(merged(x), adapted, atol=1e-5)
    card = ModelCard(
        backbone=cfg.backbone, classes=["a", "b"], preprocess=spec, kwargs=card_kwargs(merged, cfg)
    )
    assert card.kwargs["config"]["model_type"] == kind
    save_model(merged, card, tmp_path)
    again, card2 = load_model(tmp_path)  # rebuilt from model.json alone: no hub, no kwargs from the user
    with torch.no_grad():
        assert torch.equal(again(x), merged(x))
    assert card2.backbone == f"hf:{kind}"


def test_hf_model_exports_to_onnx_with_the_same_logits(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from roadwork.export.onnx import export_onnx

    torch.manual_seed(0)
    model, _ = create_model(ModelConfig(backbone="hf:dinov2", image_size=32, kwargs=TINY), 2)
    model.eval()
    x = np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype(np.float32)
    export_onnx(model, x, tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    assert np.abs(sess.run(None, {"input": x})[0] - expected).max() < 1e-4


def _offline(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """What HF_HUB_OFFLINE=1 does, for a process that imported huggingface_hub already (no network retries)."""
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_hub_ids_fail_offline_naming_the_weights_option(monkeypatch):
    _offline(monkeypatch)
    cfg = ModelConfig(backbone="hf:facebook/dinov2-small-not-cached", pretrained=True)
    with pytest.raises(ConfigError, match="model.weights=PATH"):
        create_model(cfg, 2)
    with pytest.raises(ConfigError, match="model type"):
        create_model(ModelConfig(backbone="hf:dinov2", pretrained=True), 2)
    with pytest.raises(ConfigError, match="names no model"):
        create_model(ModelConfig(backbone="hf:"), 2)
    with pytest.raises(ConfigError, match="hf:no_such_type"):
        create_model(ModelConfig(backbone="hf:no_such_type", kwargs=TINY), 2)


def test_local_save_pretrained_folder_is_loaded_offline(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    _offline(monkeypatch)
    torch.manual_seed(1)
    backbone = transformers.AutoModel.from_config(transformers.AutoConfig.for_model("dinov2", **TINY))
    backbone.save_pretrained(tmp_path / "dino")
    cfg = ModelConfig(
        backbone="hf:facebook/dinov2-small", weights=str(tmp_path / "dino"), pretrained=True, image_size=32
    )
    model, spec = create_model(cfg, 2)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(
            model.backbone(pixel_values=x).last_hidden_state, backbone(pixel_values=x).last_hidden_state
        )
    assert spec.mean == (0.485, 0.456, 0.406)  # no image processor saved: ImageNet statistics


CONVNEXT = {"depths": [1, 1, 1, 1], "hidden_sizes": [8, 16, 32, 64]}


def test_hf_convnext_trains_with_lora_round_trips_and_exports(tmp_path):
    """hf:convnext (a CNN: feature maps, no tokens) is pooled by its own pooler, not treated as a ViT."""
    ort = pytest.importorskip("onnxruntime")
    from roadwork.export.onnx import export_onnx

    torch.manual_seed(0)
    cfg = ModelConfig(backbone="hf:convnext", image_size=32, kwargs=CONVNEXT, pretrained=False)
    model, _ = create_model(cfg, 2)
    assert model.pooling == "mean" and model.num_features == 64
    peft_model = prepare_finetune(model, "lora", rank=4, alpha=8)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 2, (8,), generator=g)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(10):
        loss = torch.nn.functional.cross_entropy(peft_model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    merged = merge_adapters(peft_model).eval()
    card = ModelCard(
        backbone=cfg.backbone, classes=["a", "b"], preprocess=_spec(), kwargs=card_kwargs(merged, cfg)
    )
    save_model(merged, card, tmp_path)
    again, _ = load_model(tmp_path)
    with torch.no_grad():
        assert torch.equal(again(x), merged(x))
    xs = x[:3].numpy()
    export_onnx(merged, xs, tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        assert np.abs(sess.run(None, {"input": xs})[0] - merged(x[:3]).numpy()).max() < 1e-4


def _spec():  # type: ignore[no-untyped-def]
    from roadwork.data.preprocess import PreprocessSpec

    return PreprocessSpec(size=32)


def test_hf_convnext_with_a_token_pooling_is_a_config_error():
    with pytest.raises(ConfigError, match="model.pooling='cls' needs a class token"):
        create_model(ModelConfig(backbone="hf:convnext", image_size=32, kwargs=CONVNEXT, pooling="cls"), 2)
