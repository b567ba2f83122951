"""ExPLoRA (Khanna et al., ICML 2025, arXiv 2406.10973): extend a ViT's self-supervised pre-training to the
target domain before fine-tuning, cheaply.

Step (a), :func:`explora_pretrain`, on *unlabelled* target-domain images:

- DINO self-distillation: a student and an EMA teacher (momentum ``teacher_momentum``), each the backbone plus a
  projection head (MLP → L2-normalised bottleneck → prototypes); multi-crop views — 2 global crops (scale 0.4–1)
  seen by both, ``local_crops`` local crops (scale 0.05–0.4, resized to the same side so positional embeddings
  need no interpolation) seen by the student only; cross-entropy between the teacher's centred, sharpened
  distribution (temperature 0.04, centre EMA 0.9) and the student's (temperature 0.1) over every
  (global teacher view, other student view) pair;
- KoLeo on the student's class tokens of the first global view (−mean log nearest-neighbour distance of the
  L2-normalised features), weight 0.1;
- what trains: the last ``unfreeze_last`` blocks entirely, every norm layer, LoRA (rank ``lora_rank``) on the
  attention ``qkv`` of every other block, and the projection head. Everything else stays frozen.

The LoRA weights are merged and the backbone's state is returned; step (b) is ordinary supervised (LoRA)
fine-tuning from it (``train.recipe=explora`` does both in the train stage). What is left out of the paper:
iBOT's masked-patch loss (DINOv2's second objective) and the paper's larger crop/augmentation set.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from roadwork._deps import require
from roadwork.config import ModelConfig
from roadwork.data.preprocess import PreprocessSpec
from roadwork.errors import ConfigError

__all__ = ["explora_pretrain", "explora_trainable"]


def _backbone(model_cfg: ModelConfig) -> Any:
    timm = require("timm")
    net = timm.create_model(model_cfg.backbone, pretrained=False, num_classes=0, **model_cfg.kwargs)
    if not hasattr(net, "blocks") or not hasattr(net, "cls_token"):
        raise ConfigError(
            f"train.recipe=explora needs a ViT backbone with a class token; {model_cfg.backbone!r} is not one."
        )
    return net


def explora_trainable(net: Any, *, unfreeze_last: int, lora_rank: int) -> Any:
    """Freeze ``net``; unfreeze its last blocks and all norms; LoRA on the other blocks' ``attn.qkv``."""
    peft = require("peft")
    torch = require("torch")
    depth = len(net.blocks)
    if not 0 <= unfreeze_last <= depth:
        raise ConfigError(f"train.explora_unfreeze={unfreeze_last} must be between 0 and the depth {depth}.")
    targets = [f"blocks.{i}.attn.qkv" for i in range(depth - unfreeze_last)]
    for p in net.parameters():
        p.requires_grad_(False)
    if targets:
        net = peft.get_peft_model(
            net, peft.LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules=targets, bias="none")
        )
    inner = net.get_base_model() if hasattr(net, "get_base_model") else net
    for i in range(depth - unfreeze_last, depth):
        for p in inner.blocks[i].parameters():
            p.requires_grad_(True)
    for m in inner.modules():
        if isinstance(m, torch.nn.LayerNorm):
            for p in m.parameters():
                p.requires_grad_(True)
    return net


def _head(torch: Any, dim: int, prototypes: int) -> Any:
    nn = torch.nn
    return nn.ModuleDict(
        {
            "mlp": nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)),
            "prototypes": nn.Linear(dim, prototypes, bias=False),
        }
    )


def _project(torch: Any, head: Any, feats: Any) -> Any:
    z = torch.nn.functional.normalize(head["mlp"](feats), dim=-1)
    return head["prototypes"](z)


def _views(torch: Any, u8: Any, spec: PreprocessSpec, n_local: int, gen: Any) -> list[Any]:
    """2 global + ``n_local`` local random-resized crops of a uint8 batch (N, H, W, 3) → float (N, 3, S, S)."""
    from roadwork.training.augment import to_input

    x = to_input(torch, u8, spec)  # normalised, (N, 3, S, S)
    n, _, h, w = x.shape
    views = []
    for k in range(2 + n_local):
        lo, hi = (0.4, 1.0) if k < 2 else (0.05, 0.4)
        out = torch.empty_like(x)
        scale = lo + (hi - lo) * torch.rand(n, generator=gen)
        for i in range(n):
            side = max(2, round(math.sqrt(float(scale[i])) * min(h, w)))
            top = int(torch.randint(0, h - side + 1, (1,), generator=gen))
            left = int(torch.randint(0, w - side + 1, (1,), generator=gen))
            crop = x[i : i + 1, :, top : top + side, left : left + side]
            crop = torch.nn.functional.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)
            out[i] = crop[0].flip(-1) if bool(torch.rand(1, generator=gen) < 0.5) else crop[0]
        views.append(out)
    return views


def _koleo(torch: Any, feats: Any, eps: float = 1e-8) -> Any:
    z = torch.nn.functional.normalize(feats, dim=-1)
    d = torch.cdist(z, z)
    d = d + torch.eye(len(z)) * 1e6  # exclude each point itself
    return -torch.log(d.min(dim=1).values + eps).mean()


def _dino_step(
    torch: Any,
    views: list[Any],
    student: tuple[Any, Any],
    teacher: tuple[Any, Any],
    opt: Any,
    center: Any,
    koleo_weight: float,
    momentum: float,
) -> tuple[Any, Any, Any]:
    """One DINO self-distillation step: the student matches the teacher's centred, sharpened outputs on the two
    global views from every other view (+ KoLeo); then the teacher follows by EMA and the centre moves.
    Returns (DINO loss, KoLeo term, new centre)."""
    (student_net, head), (teacher_net, teacher_head) = student, teacher
    with torch.no_grad():
        t_out = [
            torch.softmax((_project(torch, teacher_head, teacher_net(v)) - center) / 0.04, -1)
            for v in views[:2]
        ]
    s_feats = [student_net(v) for v in views]
    s_out = [torch.log_softmax(_project(torch, head, f) / 0.1, -1) for f in s_feats]
    loss: Any = 0.0
    pairs = 0
    for ti, t in enumerate(t_out):
        for si, lp in enumerate(s_out):
            if si != ti:
                loss = loss + (-(t * lp).sum(-1).mean())
                pairs += 1
    loss = loss / pairs
    koleo = _koleo(torch, s_feats[0])
    opt.zero_grad(set_to_none=True)
    (loss + koleo_weight * koleo).backward()
    opt.step()
    with torch.no_grad():
        for pt, ps in zip(
            [*teacher_net.parameters(), *teacher_head.parameters()],
            [*student_net.parameters(), *head.parameters()],
            strict=True,
        ):
            pt.mul_(momentum).add_(ps.detach(), alpha=1 - momentum)
        batch_center = torch.cat([_project(torch, teacher_head, teacher_net(v)) for v in views[:2]]).mean(0)
        center = 0.9 * center + 0.1 * batch_center
    return loss, koleo, center


def explora_pretrain(
    model_cfg: ModelConfig,
    images_u8: np.ndarray,
    *,
    epochs: int = 5,
    batch_size: int = 64,
    lr: float = 5e-4,
    unfreeze_last: int = 1,
    lora_rank: int = 8,
    local_crops: int = 2,
    prototypes: int = 256,
    koleo_weight: float = 0.1,
    teacher_momentum: float = 0.996,
    init_state: dict[str, Any] | None = None,
    seed: int = 0,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """Step (a) on ``images_u8`` (N, S, S, 3, already at ``model_cfg.image_size``); returns the merged backbone's
    state (timm names, no head) and per-epoch losses. ``init_state``: the backbone to extend (e.g. pretrained)."""
    torch = require("torch")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = _backbone(model_cfg)
    if init_state is not None:  # must fit the backbone (model.strict=false: what fits, the rest listed)
        from roadwork.models.factory import load_weights_into

        load_weights_into(net, init_state, strict=model_cfg.strict, source="the ExPLoRA init_state")
    student = explora_trainable(net, unfreeze_last=unfreeze_last, lora_rank=lora_rank)
    head = _head(torch, int(net.num_features), prototypes)
    teacher_net, teacher_head = copy.deepcopy(student), copy.deepcopy(head)
    for p in [*teacher_net.parameters(), *teacher_head.parameters()]:
        p.requires_grad_(False)
    params = [p for p in [*student.parameters(), *head.parameters()] if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.04)
    center = torch.zeros(prototypes)
    spec = PreprocessSpec(size=model_cfg.image_size)
    u8 = torch.from_numpy(np.asarray(images_u8))
    history: list[dict[str, float]] = []
    student.train()
    for epoch in range(epochs):
        order = torch.randperm(len(u8), generator=gen)
        total, koleo_total, steps = 0.0, 0.0, 0
        for s in range(0, len(u8), batch_size):
            idx = order[s : s + batch_size]
            if len(idx) < 2:
                continue
            views = _views(torch, u8[idx], spec, local_crops, gen)
            loss, koleo, center = _dino_step(
                torch,
                views,
                (student, head),
                (teacher_net, teacher_head),
                opt,
                center,
                koleo_weight,
                teacher_momentum,
            )
            total += float(loss.detach())
            koleo_total += float(koleo.detach())
            steps += 1
        row = {"epoch": epoch + 1, "dino_loss": total / max(steps, 1), "koleo": koleo_total / max(steps, 1)}
        history.append(row)
        if on_epoch is not None:
            on_epoch(epoch + 1, row)
    merged = student.merge_and_unload() if hasattr(student, "merge_and_unload") else student
    state = {k: v.detach().clone() for k, v in merged.state_dict().items()}
    return state, history
