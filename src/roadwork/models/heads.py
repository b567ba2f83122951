"""Classifier heads and token pooling on top of a timm backbone.

``model.pooling``: ``default`` (the backbone's own), ``cls`` (the class token), ``mean`` (mean of the patch
tokens, or global average pooling for CNNs), ``cls+mean`` (both concatenated, as DINOv2's linear probe).
``model.head``: ``linear`` or ``mlp`` (Linear → GELU → Dropout → Linear, hidden width = feature width).
With ``default`` + ``linear`` the plain timm model is used, unchanged (:func:`roadwork.models.network.build_network`).
"""

from __future__ import annotations

from typing import Any

from roadwork._deps import require
from roadwork.errors import ConfigError

__all__ = ["PooledClassifier", "make_head", "pool_tokens"]


def make_head(dim: int, num_classes: int, head: str, drop_rate: float) -> Any:
    """``linear`` (Dropout → Linear) or ``mlp`` (Linear → GELU → Dropout → Linear, hidden width = ``dim``)."""
    nn = require("torch").nn
    if head == "linear":
        return nn.Sequential(nn.Dropout(drop_rate), nn.Linear(dim, num_classes))
    if head == "mlp":
        return nn.Sequential(
            nn.Linear(dim, dim), nn.GELU(), nn.Dropout(drop_rate), nn.Linear(dim, num_classes)
        )
    raise ConfigError(f"model.head={head!r} is not one of linear, mlp.")


def pool_tokens(f: Any, pooling: str, prefix: int) -> Any:
    """(B, T, D) tokens → (B, D) or (B, 2D): the class token, the mean of the tokens after ``prefix`` (class and
    register tokens), or both concatenated."""
    if pooling == "cls":
        return f[:, 0]
    if pooling == "mean":
        return f[:, prefix:].mean(dim=1)
    return require("torch").cat([f[:, 0], f[:, prefix:].mean(dim=1)], dim=1)


def _module_base() -> Any:
    return require("torch").nn.Module


class PooledClassifier(_module_base()):  # type: ignore[misc]
    """A backbone's unpooled features → pooling → head. Looks like a timm model to the rest of roadwork."""

    def __init__(self, backbone: Any, num_classes: int, pooling: str, head: str, drop_rate: float) -> None:
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        self.prefix = int(getattr(backbone, "num_prefix_tokens", 0))
        self.tokens = hasattr(backbone, "blocks") and self.prefix >= 0 and hasattr(backbone, "cls_token")
        width = int(backbone.num_features)
        if pooling in ("cls", "cls+mean") and (not self.tokens or self.prefix == 0):
            raise ConfigError(
                f"model.pooling={pooling!r} needs a ViT with a class token; use mean or default."
            )
        self.head = make_head(2 * width if pooling == "cls+mean" else width, num_classes, head, drop_rate)
        self.num_classes = num_classes

    def get_classifier(self) -> Any:
        return self.head

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)

    def forward(self, x: Any) -> Any:
        f = self.backbone.forward_features(x)
        if f.ndim == 4:  # CNN feature map (B, C, H, W)
            return self.head(f.mean(dim=(2, 3)))
        return self.head(pool_tokens(f, self.pooling, self.prefix))
