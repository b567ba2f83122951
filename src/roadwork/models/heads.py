"""Classifier heads and token pooling on top of a timm backbone.

``model.pooling``: ``default`` (the backbone's own), ``cls`` (the class token), ``mean`` (mean of the patch
tokens, or global average pooling for CNNs), ``cls+mean`` (both concatenated, as DINOv2's linear probe).
``model.head``: ``linear`` or ``mlp`` (Linear → GELU → Dropout → Linear, hidden width = feature width).
With ``default`` + ``linear`` the plain timm model is used, unchanged.
"""

from __future__ import annotations

from typing import Any

from roadwork._deps import require
from roadwork.errors import ConfigError

__all__ = ["PooledClassifier", "build_network"]


def _module_base() -> Any:
    return require("torch").nn.Module


class PooledClassifier(_module_base()):  # type: ignore[misc]
    """A backbone's unpooled features → pooling → head. Looks like a timm model to the rest of roadwork."""

    def __init__(self, backbone: Any, num_classes: int, pooling: str, head: str, drop_rate: float) -> None:
        super().__init__()
        nn = require("torch").nn
        self.backbone = backbone
        self.pooling = pooling
        self.prefix = int(getattr(backbone, "num_prefix_tokens", 0))
        self.tokens = hasattr(backbone, "blocks") and self.prefix >= 0 and hasattr(backbone, "cls_token")
        width = int(backbone.num_features)
        if pooling in ("cls", "cls+mean") and (not self.tokens or self.prefix == 0):
            raise ConfigError(
                f"model.pooling={pooling!r} needs a ViT with a class token; use mean or default."
            )
        dim = 2 * width if pooling == "cls+mean" else width
        if head == "linear":
            self.head = nn.Sequential(nn.Dropout(drop_rate), nn.Linear(dim, num_classes))
        elif head == "mlp":
            self.head = nn.Sequential(
                nn.Linear(dim, dim), nn.GELU(), nn.Dropout(drop_rate), nn.Linear(dim, num_classes)
            )
        else:
            raise ConfigError(f"model.head={head!r} is not one of linear, mlp.")
        self.num_classes = num_classes

    def get_classifier(self) -> Any:
        return self.head

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)

    def forward(self, x: Any) -> Any:
        f = self.backbone.forward_features(x)
        if f.ndim == 4:  # CNN feature map (B, C, H, W)
            pooled = f.mean(dim=(2, 3))
        elif self.pooling == "cls":
            pooled = f[:, 0]
        elif self.pooling == "mean":
            pooled = f[:, self.prefix :].mean(dim=1)
        else:
            pooled = require("torch").cat([f[:, 0], f[:, self.prefix :].mean(dim=1)], dim=1)
        return self.head(pooled)


def build_network(
    backbone: str,
    num_classes: int,
    *,
    drop_rate: float,
    kwargs: dict[str, Any],
    head: str = "linear",
    pooling: str = "default",
    pretrained: bool = False,
    weights: str | None = None,
) -> Any:
    """A timm model (with a :class:`PooledClassifier` when pooling or head are not timm's own), or a Hugging Face
    ``transformers`` backbone for ``hf:`` names (:mod:`roadwork.models.hf`; ``weights`` is only read there)."""
    from roadwork.models.hf import build_hf, is_hf

    if is_hf(backbone):
        return build_hf(
            backbone,
            num_classes,
            drop_rate=drop_rate,
            kwargs=kwargs,
            head=head,
            pooling=pooling,
            pretrained=pretrained,
            weights=weights,
        )
    timm = require("timm")
    if head == "linear" and pooling == "default":
        return timm.create_model(
            backbone, pretrained=pretrained, num_classes=num_classes, drop_rate=drop_rate, **kwargs
        )
    net = timm.create_model(backbone, pretrained=pretrained, num_classes=0, **kwargs)
    return PooledClassifier(net, num_classes, pooling if pooling != "default" else "mean", head, drop_rate)
