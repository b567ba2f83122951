"""Fine-tuning modes: full, linear probe, and adapters through Hugging Face peft (LoRA, DoRA, rsLoRA, DoRAN).

``prepare_finetune`` wraps a timm model for training; ``merge_adapters`` folds the adapters back into plain
weights, so what is saved, exported and served is an ordinary timm model (the merged model gives the same
logits as the adapted one, tested to 1e-5).

Target modules per architecture (``target_modules=None``):

- timm ViTs (fused attention): every ``attn.qkv`` linear — the LoRA of the DINOv2 and ExPLoRA papers on timm;
- Hugging Face attention: ``query`` and ``value`` (transformers 4 DINOv2), ``q_proj`` and ``v_proj`` (transformers 5
  DINOv2, DINOv3);
- anything else (ConvNeXt, EfficientNet, ResNet ...): every ``nn.Linear`` and 1x1 ``nn.Conv2d`` outside the head.

The classifier head is always fully trained (peft ``modules_to_save``). ``doran`` is peft's DoRA with the
learnable denominator offset of DoRAN (:mod:`roadwork.models.doran`).
"""

from __future__ import annotations

from typing import Any, Literal

from roadwork._deps import require
from roadwork.errors import ConfigError

__all__ = [
    "FINETUNE_MODES",
    "count_trainable",
    "default_targets",
    "head_name",
    "merge_adapters",
    "prepare_finetune",
]

Finetune = Literal["full", "linear_probe", "lora", "dora", "doran", "rslora"]
FINETUNE_MODES: tuple[str, ...] = ("full", "linear_probe", "lora", "dora", "doran", "rslora")
"""The values of ``train.finetune``."""


def head_name(model: Any) -> str:
    """The qualified module name of the classifier head (timm's ``get_classifier()``)."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    for name, module in model.named_modules():
        if module is head:
            return name
    raise ConfigError(f"Cannot find the classifier head of {type(model).__name__}; use train.finetune=full.")


def default_targets(model: Any) -> list[str]:
    """The modules that get adapters when ``train.target_modules`` is null, chosen per architecture."""
    torch = require("torch")
    names = [n for n, _ in model.named_modules()]
    if any(n.endswith("attn.qkv") for n in names):
        return sorted({n for n in names if n.endswith("attn.qkv")})
    if any(n.endswith(".query") for n in names) and any(n.endswith(".value") for n in names):
        return sorted(n for n in names if n.endswith((".query", ".value")))
    if any(n.endswith("attention.q_proj") for n in names):  # transformers 5 DINOv2 / DINOv3
        return sorted(n for n in names if n.endswith(("attention.q_proj", "attention.v_proj")))
    head = head_name(model)
    out = []
    for n, m in model.named_modules():
        if n == head or n.startswith(head + "."):
            continue
        if isinstance(m, torch.nn.Linear) or (
            isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1
        ):
            out.append(n)
    if not out:
        raise ConfigError(
            f"No layer of {type(model).__name__} can carry an adapter; use train.finetune=full."
        )
    return out


def prepare_finetune(
    model: Any,
    mode: str,
    *,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    target_modules: list[str] | None = None,
) -> Any:
    """Return the model to train: the same module (full / linear probe) or a peft wrapper (adapters)."""
    if mode not in FINETUNE_MODES:
        raise ConfigError(f"train.finetune={mode!r} is not one of {', '.join(FINETUNE_MODES)}.")
    head = head_name(model)
    if mode == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if mode == "linear_probe":
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(head + ".") or name == head)
        return model
    peft = require("peft")
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules or default_targets(model),
        use_dora=mode in ("dora", "doran"),
        use_rslora=mode == "rslora",
        modules_to_save=[head],
        bias="none",
    )
    wrapped = peft.get_peft_model(model, config)
    if mode == "doran":
        from roadwork.models.doran import enable_doran

        enable_doran(wrapped)
    return wrapped


def merge_adapters(model: Any) -> Any:
    """The plain model with adapters folded into its weights (a no-op for full / linear probe)."""
    if hasattr(model, "merge_and_unload"):
        merged = model.merge_and_unload()
        for p in merged.parameters():
            p.requires_grad_(True)
        return merged
    return model


def count_trainable(model: Any) -> int:
    """The number of parameters that receive gradients."""
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad))
