"""Hugging Face ``transformers`` backbones: ``model.backbone=hf:<model id | local folder | model type>``.

- ``hf:facebook/dinov2-small``, ``hf:facebook/dinov3-vits16-pretrain-lvd1689m`` … with ``model.pretrained=true``:
  ``AutoModel.from_pretrained`` (hub or cache); offline it fails with an error that names ``model.weights``.
- ``model.weights=FOLDER`` (a ``save_pretrained`` folder) or ``model.weights=FILE.safetensors`` (the backbone's
  state dict): local weights, no network.
- ``hf:dinov2``, ``hf:dinov3_vit`` … (a ``model_type``): random weights from ``AutoConfig.for_model(type,
  **model.kwargs)`` — tiny configurations for tests, or training from scratch.

The backbone's full config is stored in ``model.json`` (``kwargs["config"]``), so export and serving rebuild the
network offline. Pooling of ``last_hidden_state``: ``cls``, ``mean`` (patch tokens, registers excluded) or
``cls+mean`` (the default, as ``Dinov2ForImageClassification`` and DINOv2's linear probe); the head is ``linear``
or ``mlp``. LoRA targets the attention's ``q_proj``/``v_proj`` (``models/adapters.py``).

Convolutional backbones (``hf:convnext``, ``hf:facebook/convnext-tiny-224``, ``hf:resnet`` …: a config with
``hidden_sizes`` and no ``hidden_size``) output a feature map, not tokens: they are pooled by the model's own
``pooler_output`` (global average, plus ConvNeXt's layer norm), ``model.pooling=mean`` (the default for them);
``cls`` is refused — there is no class token. LoRA then targets their linear and 1x1 convolution layers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from roadwork._deps import require
from roadwork.data.preprocess import PreprocessSpec
from roadwork.errors import ConfigError
from roadwork.models.heads import make_head, pool_tokens

__all__ = ["HF_PREFIX", "HFClassifier", "build_hf", "hf_preprocess", "is_hf"]

HF_PREFIX = "hf:"
"""The ``model.backbone`` prefix of Hugging Face ``transformers`` backbones."""
# PIL resample codes in image processor configs
_RESAMPLE: dict[int, Literal["nearest", "bilinear", "bicubic"]] = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def is_hf(backbone: str) -> bool:
    """Whether ``model.backbone`` names a ``transformers`` backbone (``hf:...``)."""
    return backbone.startswith(HF_PREFIX)


def _module_base() -> Any:
    return require("torch").nn.Module


class HFClassifier(_module_base()):  # type: ignore[misc]
    """A ``transformers`` vision backbone → token pooling → head; looks like a timm model to roadwork."""

    def __init__(self, backbone: Any, num_classes: int, pooling: str, head: str, drop_rate: float) -> None:
        super().__init__()
        if pooling not in ("cls", "mean", "cls+mean"):
            raise ConfigError(f"model.pooling={pooling!r} is not one of default, cls, mean, cls+mean.")
        config = backbone.config
        self.spatial = _is_spatial(config)  # a CNN: (B, C, H, W) feature maps, no tokens
        if self.spatial and pooling != "mean":
            raise ConfigError(
                f"model.pooling={pooling!r} needs a class token, which the convolutional backbone "
                f"{config.model_type!r} has not; use model.pooling=mean (its default)."
            )
        self.backbone = backbone
        self.pooling = pooling
        self.prefix = 1 + int(getattr(config, "num_register_tokens", 0) or 0)
        width = int(config.hidden_sizes[-1] if self.spatial else config.hidden_size)
        self.num_features = width
        self.head = make_head(2 * width if pooling == "cls+mean" else width, num_classes, head, drop_rate)
        self.num_classes = num_classes

    def get_classifier(self) -> Any:
        return self.head

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            self.backbone.gradient_checkpointing_enable()
        else:
            self.backbone.gradient_checkpointing_disable()

    def forward(self, x: Any) -> Any:
        out = self.backbone(pixel_values=x)
        if self.spatial:  # the model's own global pooling: (B, C) or (B, C, 1, 1)
            pooled = (
                out.pooler_output if out.pooler_output is not None else out.last_hidden_state.mean((2, 3))
            )
            return self.head(pooled.flatten(1))
        return self.head(pool_tokens(out.last_hidden_state, self.pooling, self.prefix))


def _is_spatial(config: Any) -> bool:
    """A convolutional backbone's config: stage widths (``hidden_sizes``), no token width (``hidden_size``)."""
    return not hasattr(config, "hidden_size") and bool(getattr(config, "hidden_sizes", None))


def _offline_error(name: str, e: Exception) -> ConfigError:
    return ConfigError(
        f"Could not load model.backbone={name!r} from the Hugging Face hub ({type(e).__name__}); this machine may "
        "be offline. Pass model.weights=PATH to a local save_pretrained folder; or name the model type "
        "(e.g. hf:dinov2 with its config fields in model.kwargs) and pass a .safetensors file, or set "
        "model.pretrained=false for random weights."
    )


def _backbone(name: str, kwargs: dict[str, Any], pretrained: bool, weights: str | None) -> Any:
    transformers = require("transformers")
    source = name[len(HF_PREFIX) :].strip()
    if not source:
        raise ConfigError(
            f"model.backbone={name!r} names no model; use hf:<model id> (e.g. hf:facebook/dinov2-small), "
            "hf:<local folder> or hf:<model type> (e.g. hf:dinov2)."
        )
    stored = kwargs.get("config")
    if isinstance(stored, dict):  # a model.json written by roadwork: rebuild offline from the stored config
        d = dict(stored)
        return transformers.AutoModel.from_config(transformers.AutoConfig.for_model(d.pop("model_type"), **d))
    if weights is not None and Path(weights).is_dir():
        try:
            return transformers.AutoModel.from_pretrained(weights)
        except (OSError, ValueError) as e:
            raise ConfigError(f"model.weights={weights!r} is not a save_pretrained folder: {e}") from None
    if "/" not in source and not Path(source).exists():  # a model type: random weights from a config
        if pretrained and weights is None:
            raise ConfigError(
                f"model.backbone={name!r} names a model type, which has no pretrained weights; use a model id "
                "such as hf:facebook/dinov2-small, or model.pretrained=false."
            )
        try:
            config = transformers.AutoConfig.for_model(source, **kwargs)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"model.backbone={name!r} with model.kwargs={kwargs!r}: {e}") from None
        return transformers.AutoModel.from_config(config)
    try:
        if pretrained and weights is None:
            return transformers.AutoModel.from_pretrained(source, **kwargs)
        return transformers.AutoModel.from_config(transformers.AutoConfig.from_pretrained(source, **kwargs))
    except OSError as e:
        raise _offline_error(name, e) from None


def build_hf(
    name: str,
    num_classes: int,
    *,
    drop_rate: float,
    kwargs: dict[str, Any],
    head: str,
    pooling: str,
    pretrained: bool = False,
    weights: str | None = None,
) -> Any:
    """An :class:`HFClassifier` for ``model.backbone=hf:...``: hub weights (``pretrained``), a local folder or
    file (``weights``), or random weights from a model type's config; ``pooling=default`` is ``mean`` for CNNs and
    ``cls+mean`` for ViTs. The backbone's whole config goes into ``card_kwargs`` (``model.json``)."""
    net = _backbone(name, kwargs, pretrained, weights)
    if not hasattr(net.config, "hidden_size") and not _is_spatial(net.config):
        raise ConfigError(
            f"model.backbone={name!r} ({type(net).__name__}) is neither a vision transformer (hidden_size) nor a "
            "convolutional network (hidden_sizes); roadwork's hf: path takes ViT-like (DINOv2, DINOv3, ViT) and "
            "CNN (ConvNeXt, ResNet) backbones. Use a timm name instead, e.g. model.backbone=convnext_tiny."
        )
    if pooling == "default":
        pooling = "mean" if _is_spatial(net.config) else "cls+mean"
    model = HFClassifier(net, num_classes, pooling, head, drop_rate)
    config = net.config.to_dict()
    model.card_kwargs = {"config": {k: v for k, v in config.items() if k not in ("transformers_version",)}}
    return model


def hf_preprocess(name: str, weights: str | None, size: int) -> PreprocessSpec:
    """Mean, std and interpolation from the model's image processor config; ImageNet's when there is none."""
    transformers = require("transformers")
    source = weights if weights is not None and Path(weights).is_dir() else name[len(HF_PREFIX) :]
    try:
        proc = transformers.AutoImageProcessor.from_pretrained(source)
    except (OSError, ValueError):
        return PreprocessSpec(size=size)
    crop = getattr(proc, "crop_size", None) or {}
    short = (getattr(proc, "size", None) or {}).get("shortest_edge")
    crop_pct = float(crop["height"]) / float(short) if crop.get("height") and short else 1.0
    return PreprocessSpec(
        size=size,
        crop_pct=min(crop_pct, 1.0),
        interpolation=_RESAMPLE.get(int(getattr(proc, "resample", 2) or 2), "bilinear"),
        mean=(float(proc.image_mean[0]), float(proc.image_mean[1]), float(proc.image_mean[2])),
        std=(float(proc.image_std[0]), float(proc.image_std[1]), float(proc.image_std[2])),
    )
