"""One network from ``model.*``: a timm model, a timm backbone under a :class:`~roadwork.models.heads.PooledClassifier`,
or a Hugging Face ``transformers`` backbone (:mod:`roadwork.models.hf`).

Its own module so that :mod:`~roadwork.models.heads` and :mod:`~roadwork.models.hf` do not import each other:
both sit below it.
"""

from __future__ import annotations

from typing import Any

from roadwork._deps import require
from roadwork.models.heads import PooledClassifier
from roadwork.models.hf import build_hf, is_hf

__all__ = ["build_network"]


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
