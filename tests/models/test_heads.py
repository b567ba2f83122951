"""Heads and pooling: shapes, what each pooling reads, adapters on top, save/load and ONNX export round trips."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

from roadwork.config import ModelConfig  # noqa: E402
from roadwork.errors import ConfigError  # noqa: E402
from roadwork.models.factory import ModelCard, create_model, load_model, save_model  # noqa: E402


def _cfg(**kw):  # type: ignore[no-untyped-def]
    return ModelConfig(backbone="test_vit", image_size=32, drop_rate=0.0, kwargs={"img_size": 32}, **kw)


@pytest.mark.parametrize("pooling", ["cls", "mean", "cls+mean"])
@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_pooling_and_heads(pooling, head):
    torch.manual_seed(0)
    net, _ = create_model(_cfg(pooling=pooling, head=head), 3)
    x = torch.randn(4, 3, 32, 32)
    assert net(x).shape == (4, 3)
    width = net.backbone.num_features
    first = net.get_classifier()[1 if head == "linear" else 0]
    assert first.in_features == (2 * width if pooling == "cls+mean" else width)
    tokens = net.backbone.forward_features(x)
    if pooling == "cls":  # the class token alone decides: changing the patch tokens' mean path is irrelevant
        pooled = tokens[:, 0]
        assert torch.allclose(net.head(pooled), net(x), atol=1e-6)


def test_class_token_pooling_needs_a_vit():
    with pytest.raises(ConfigError, match="class token"):
        create_model(ModelConfig(backbone="test_resnet", image_size=32, pooling="cls"), 2)


def test_lora_on_a_pooled_vit_and_save_load_export_round_trip(tmp_path):
    from roadwork.data.preprocess import PreprocessSpec
    from roadwork.export.onnx import export_onnx, onnx_logits, onnx_session
    from roadwork.models.adapters import count_trainable, merge_adapters, prepare_finetune

    torch.manual_seed(0)
    cfg = _cfg(pooling="cls+mean", head="mlp")
    net, _ = create_model(cfg, 2)
    lora = prepare_finetune(net, "lora", rank=4)
    assert 0 < count_trainable(lora) < sum(p.numel() for p in net.parameters())
    merged = merge_adapters(lora).eval()
    card = ModelCard(
        "test_vit",
        ["a", "b"],
        PreprocessSpec(size=32),
        kwargs={"img_size": 32},
        head="mlp",
        pooling="cls+mean",
    )
    save_model(merged, card, tmp_path)
    back, card2 = load_model(tmp_path)
    assert card2.pooling == "cls+mean" and card2.head == "mlp"
    x = np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        ref = merged(torch.from_numpy(x)).numpy()
        assert np.allclose(back(torch.from_numpy(x)).numpy(), ref, atol=1e-6)
    export_onnx(back, x, tmp_path / "m.onnx")
    assert np.abs(onnx_logits(onnx_session(tmp_path / "m.onnx"), x) - ref).max() < 1e-4


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_both_exporters_give_the_torch_logits_at_any_batch_size(tmp_path, exporter):
    from roadwork.export.onnx import export_onnx, onnx_logits, onnx_session

    torch.manual_seed(0)
    net, _ = create_model(_cfg(), 2)
    net.eval()
    x = np.random.default_rng(0).normal(size=(5, 3, 32, 32)).astype(np.float32)
    used = export_onnx(net, x, tmp_path / "m.onnx", exporter=exporter)
    assert used == exporter
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    sess = onnx_session(tmp_path / "m.onnx")
    assert np.abs(onnx_logits(sess, x) - ref).max() < 1e-4
    assert np.abs(onnx_logits(sess, x[:1]) - ref[:1]).max() < 1e-4  # the batch dimension is dynamic
