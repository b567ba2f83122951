from __future__ import annotations

import pytest

from roadwork.config import ModelConfig
from roadwork.errors import ConfigError
from roadwork.models.factory import ModelCard, create_model, load_model, save_model

torch = pytest.importorskip("torch")


def test_unknown_backbone_gets_a_suggestion():
    with pytest.raises(ConfigError, match="Unknown backbone model.backbone='resnet1'. Did you mean"):
        create_model(ModelConfig(backbone="resnet1"), 2)


def test_pretrained_offline_says_to_pass_local_weights(monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(
        hub.constants, "HF_HUB_OFFLINE", True
    )  # read at import time; this machine is offline anyway
    with pytest.raises(ConfigError, match="Pass model.weights=PATH"):
        create_model(ModelConfig(backbone="test_resnet", pretrained=True), 2)


def test_local_weights_are_loaded_and_head_is_replaced(tmp_path):
    from safetensors.torch import save_file

    src, _ = create_model(ModelConfig(backbone="test_resnet"), 5)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "w.safetensors"))
    model, spec = create_model(
        ModelConfig(backbone="test_resnet", weights=str(tmp_path / "w.safetensors")), 2
    )
    assert torch.equal(model.state_dict()["conv1.0.weight"], src.state_dict()["conv1.0.weight"])
    assert model.get_classifier().out_features == 2
    assert spec.size == 96
    with pytest.raises(ConfigError, match="does not exist"):
        create_model(ModelConfig(backbone="test_resnet", weights=str(tmp_path / "nope.safetensors")), 2)


def test_save_and_load_round_trip_gives_identical_logits(tmp_path):
    model, spec = create_model(ModelConfig(backbone="test_resnet", kwargs={"channels": [16, 16, 16, 32]}), 3)
    card = ModelCard("test_resnet", ["a", "b", "c"], spec, 0.1, {"channels": [16, 16, 16, 32]})
    save_model(model.eval(), card, tmp_path)
    back, card2 = load_model(tmp_path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), back(x))
    assert card2 == card
