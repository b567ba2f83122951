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


def _save(state, path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return str(path)


def test_weights_that_do_not_fit_are_refused_by_name_unless_model_strict_is_false(tmp_path):
    """Strict by default: a tensor the model has not, one of another shape, one the file lacks; only the head
    may differ. model.strict=false loads what fits and lists every skipped key in a warning."""
    from roadwork.errors import RoadworkWarning

    src, _ = create_model(ModelConfig(backbone="test_resnet"), 5)
    state = dict(src.state_dict())
    state["extra.weight"] = torch.zeros(3)  # not in the model
    state["conv1.0.weight"] = torch.zeros(1, 1, 1, 1)  # another shape
    dropped = next(k for k in state if k.startswith("layer1."))
    del state[dropped]  # missing from the file
    path = _save(state, tmp_path / "w.safetensors")
    with pytest.raises(ConfigError) as e:
        create_model(ModelConfig(backbone="test_resnet", weights=path), 2)
    msg = str(e.value)
    assert (
        "extra.weight" in msg and "conv1.0.weight" in msg and dropped in msg and "model.strict=false" in msg
    )
    assert "fc.weight" not in msg  # the 5-class head is allowed to differ
    with pytest.warns(RoadworkWarning) as w:
        model, _ = create_model(ModelConfig(backbone="test_resnet", weights=path, strict=False), 2)
    said = str(w[0].message)
    assert "extra.weight" in said and "conv1.0.weight" in said and dropped in said
    key = next(k for k in state if k.startswith("layer2.") and k.endswith("weight"))
    assert torch.equal(model.state_dict()[key], src.state_dict()[key])  # what fits was loaded


def test_a_backbone_state_loads_into_a_pooled_classifier_under_its_prefix():
    from roadwork.models.factory import BACKBONE_PREFIX, load_weights_into

    net, _ = create_model(
        ModelConfig(backbone="test_vit", head="mlp", pooling="mean", kwargs={"img_size": 32}), 2
    )
    backbone = {
        k.removeprefix(BACKBONE_PREFIX): v.clone() + 1
        for k, v in net.backbone.state_dict(prefix="backbone.").items()
    }
    assert load_weights_into(net, backbone, source="a backbone") == []  # the head is new: not a mismatch
    k = next(iter(backbone))
    assert torch.equal(net.state_dict()[BACKBONE_PREFIX + k], backbone[k])
    with pytest.raises(ConfigError, match="shares no tensor"):
        load_weights_into(net, {"nothing.like.it": torch.zeros(1)}, source="a stranger")
