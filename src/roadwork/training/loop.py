"""Supervised training on Lightning Fabric: AdamW, warmup + cosine, augmentation, early stopping.

Images are decoded and resized once (uint8, shared decode path: ``data.preprocess.load_resized``) and augmented
per batch (``training.augment``: ``train.augment=none|light|standard|strong``, ``train.mixup``/``cutmix``).
Early stopping watches the validation loss; the calibration split is never loaded here.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from roadwork._deps import require
from roadwork._parallel import resolve_workers
from roadwork._progress import progress_bar, progress_write
from roadwork.config import ModelConfig, TrainConfig
from roadwork.data.preprocess import PreprocessSpec, load_resized
from roadwork.models.adapters import count_trainable, merge_adapters, prepare_finetune
from roadwork.models.factory import ModelCard, card_kwargs, create_model, load_weights_into, network_for_card
from roadwork.training.augment import BatchAugment, to_input

__all__ = [
    "Deferral",
    "Objective",
    "TrainResult",
    "ema_decay",
    "load_uint8",
    "predict_logits",
    "save_history",
    "train_model",
]


@dataclass
class TrainResult:
    """A trained network (adapters merged, eval mode), its card, per-epoch history and the best epoch."""

    model: Any
    card: ModelCard
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    trainable_params: int = 0


log = logging.getLogger(__name__)


def load_uint8(
    paths: Sequence[str],
    spec: PreprocessSpec,
    desc: str = "loading images",
    progress: bool = True,
    *,
    min_side: int | None = None,
) -> np.ndarray:
    """Decode and resize images once: uint8 array of shape (N, size, size, 3), through the shared decode path
    (``data.preprocess.load_resized``). ``min_side``: the decode side when these images also feed consumers
    of a larger size (a cascade's small net: ``decode_side(model_spec, small_spec)``); default the spec's own."""
    out = np.empty((len(paths), spec.size, spec.size, 3), np.uint8)
    for i, p in enumerate(progress_bar(paths, desc=desc, unit="img", leave=False, disable=not progress)):
        out[i] = load_resized(p, spec, min_side)
    return out


def _lr_lambda(total: int, warmup: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return f


def ema_decay(decay: float, updates: int) -> float:
    """The EMA's decay at its ``updates``-th averaging step: ``min(decay, (1 + t) / (10 + t))``, the warm-up of
    timm's and TensorFlow's EMAs. A fixed decay keeps ``decay ** t`` of the starting weights after ``t`` steps:
    0.998 ** 36 = 93 % after 3 epochs of 12 steps, 0.999 ** 240 = 79 % after 15 epochs of 16 steps (random head
    included), so on small sets the validated and kept weights would be mostly the ones training started from.
    With the warm-up, the EMA averages over roughly the last tenth of the steps until ``decay`` takes over."""
    return min(decay, (1 + updates) / (10 + updates))


def _ema_warmup_fn(decay: float) -> Callable[[list[Any], list[Any], Any], None]:
    """``AveragedModel``'s ``multi_avg_fn`` with :func:`ema_decay`'s warm-up (``num_averaged``: the averaging
    steps so far, a tensor the model keeps in its state, so a resumed run continues the same schedule)."""
    torch = require("torch")

    @torch.no_grad()
    def update(ema: list[Any], current: list[Any], num_averaged: Any) -> None:
        d = ema_decay(decay, int(num_averaged))  # one small device sync per step
        if torch.is_floating_point(ema[0]) or torch.is_complex(ema[0]):
            torch._foreach_lerp_(ema, current, 1 - d)
        else:  # integer buffers (BatchNorm's num_batches_tracked): the same average, rounded by the copy
            for e, c in zip(ema, current, strict=True):
                e.copy_(e * d + c * (1 - d))

    return update


def _raise_if_oom(e: RuntimeError, cfg: TrainConfig) -> None:
    if "out of memory" not in str(e).lower():
        return
    from roadwork.errors import RoadworkError

    half = max(1, cfg.batch_size // 2)
    raise RoadworkError(
        f"Out of memory at train.batch_size={cfg.batch_size}. Try train.batch_size={half} "
        f"train.accumulate={cfg.accumulate * 2} (same effective batch), train.grad_checkpointing=true, "
        "train.precision=bf16-mixed on a GPU, or train.finetune=lora (far fewer gradients and optimizer states)."
    ) from None


def _layer_groups(net: Any, lr: float, decay: float) -> list[dict[str, Any]]:
    """Layer-wise LR decay (BEiT/DINOv2 fine-tuning): embeddings get lr·d^(L+1), block i lr·d^(L-i), the rest lr."""
    import re

    from roadwork.errors import ConfigError

    blocks = {
        int(m.group(1)) for n, _ in net.named_modules() if (m := re.search(r"(?:^|\.)blocks\.(\d+)$", n))
    }
    if not blocks:
        raise ConfigError(
            "train.layer_decay needs a ViT-style model with 'blocks'; set train.layer_decay=null."
        )
    depth = max(blocks) + 1
    groups: dict[int, list[Any]] = {}
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        m = re.search(r"(?:^|\.)blocks\.(\d+)\.", name)
        if m:
            layer = int(m.group(1)) + 1
        elif any(k in name for k in ("patch_embed", "cls_token", "pos_embed", "reg_token", "mask_token")):
            layer = 0
        else:
            layer = depth + 1
        groups.setdefault(layer, []).append(p)
    return [{"params": ps, "lr": lr * decay ** (depth + 1 - layer)} for layer, ps in sorted(groups.items())]


@dataclass(frozen=True)
class Deferral:
    """Train a deferral gate jointly with the model (one extra output; see ``models.losses.deferral_loss``):
    the large model's probability of the true class on every train and val image, and the cost of deferring."""

    p_large_train: np.ndarray
    p_large_val: np.ndarray
    cost: float


def train_model(
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    *,
    classes: list[str],
    train_paths: Sequence[str],
    train_labels: np.ndarray,
    val_paths: Sequence[str],
    val_labels: np.ndarray,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    progress: bool = True,
    checkpoint_dir: Path | None = None,
    init_weights: Path | None = None,
    deferral: Deferral | None = None,
    init_backbone: Path | None = None,
    train_digests: Sequence[str] | None = None,
    val_digests: Sequence[str] | None = None,
) -> TrainResult:
    """Train (from ``init_weights``, a full state of this very network, or ``init_backbone``, a backbone state
    without the head, e.g. from ExPLoRA, when given); with ``checkpoint_dir``, save a resumable checkpoint after
    every epoch and resume from one of the same configuration (model, optimizer, scheduler, EMA, best weights,
    RNG: the next step is identical). ``train_digests``/``val_digests``: the images' sha256, which key the
    decoded-image cache on content (``train.cache_dir``).

    ``train.devices > 1`` runs data-parallel through Lightning Fabric (DDP; gloo on CPU, processes spawned here):
    every process takes ``train.batch_size`` images of each global batch, so N processes train like one with an
    N-times larger batch. ``on_epoch`` is then called after training, once per epoch, in this process.
    """
    fabric_mod = require("lightning_fabric")
    kwargs: dict[str, Any] = dict(
        classes=classes,
        train_paths=list(train_paths),
        train_labels=np.asarray(train_labels),
        val_paths=list(val_paths),
        val_labels=np.asarray(val_labels),
        progress=progress,
        checkpoint_dir=checkpoint_dir,
        init_weights=init_weights,
        deferral=deferral,
        init_backbone=init_backbone,
        digests=(train_digests, val_digests),
    )
    if cfg.devices > 1:
        result = _train_spawned(fabric_mod, model_cfg, cfg, kwargs)
        if on_epoch is not None:
            for row in result.history:
                on_epoch(int(row["epoch"]), row)
        return result
    fabric = fabric_mod.Fabric(accelerator=cfg.accelerator, devices=1, precision=cfg.precision)
    return _train(fabric, model_cfg, cfg, on_epoch=on_epoch, **kwargs)


def _train_spawned(
    fabric_mod: Any, model_cfg: ModelConfig, cfg: TrainConfig, kwargs: dict[str, Any]
) -> TrainResult:
    """``train.devices > 1``: DDP (or FSDP2) processes spawned here; rank 0's weights come back through a file."""
    import tempfile

    strategy: Any = "ddp_spawn"  # processes started here: it works from Python, the CLI and notebooks alike
    if cfg.strategy == "fsdp":
        from roadwork.errors import ConfigError
        from roadwork.training.fsdp import fsdp_strategy

        if cfg.ema is not None or cfg.compile:
            raise ConfigError(
                "train.strategy=fsdp does not support train.ema or train.compile yet; unset them, or use "
                "train.strategy=ddp."
            )
        strategy = fsdp_strategy(cfg.devices)
    fabric = fabric_mod.Fabric(
        accelerator=cfg.accelerator, devices=cfg.devices, strategy=strategy, precision=cfg.precision
    )
    with tempfile.TemporaryDirectory(prefix="roadwork-ddp-") as tmp:
        weights_file = Path(tmp) / "model.safetensors"
        card_d, history, best, trainable = fabric.launch(
            _train_payload, model_cfg, cfg, weights_file=weights_file, **kwargs
        )
        weights = require("safetensors.torch").load_file(str(weights_file))
    card = ModelCard.from_dict(card_d)
    model = network_for_card(card)
    model.load_state_dict(weights)
    return TrainResult(model.eval(), card, history, best, trainable)


def _train_payload(
    fabric: Any, model_cfg: ModelConfig, cfg: TrainConfig, *, weights_file: Path, **kwargs: Any
) -> tuple[Any, ...]:
    """Run in every spawned process. Rank 0 writes the weights to a file and returns only small metadata: a
    large return value through the launcher's queue deadlocks (the child waits for the parent to read, the
    parent waits for the child to exit), and shared tensors vanish with the child."""
    r = _train(fabric, model_cfg, cfg, on_epoch=None, **kwargs)
    if fabric.global_rank == 0:
        state = {k: v.detach().cpu().contiguous() for k, v in r.model.state_dict().items()}
        require("safetensors.torch").save_file(state, str(weights_file))
    return r.card.to_dict(), r.history, r.best_epoch, r.trainable_params


# ------------------------------------------------------------------------------------------ the objective


class Objective:
    """The training objective, in one place: what every step minimises, and what validation (and so early
    stopping and the kept epoch) measures.

    - ``train.loss=ce``: cross-entropy (``train.class_balance=weights``: class weights; ``train.label_smoothing``)
      on the steps, plain cross-entropy on validation; soft labels from MixUp/CutMix are taken as they are.
    - ``train.loss=gatekeeper``: the Gatekeeper loss (``models.losses.gatekeeper_loss``) on both.
    - a learned deferral gate (:class:`Deferral`): ``models.losses.deferral_loss`` on both, against the large
      model's probability of the true class on each image.
    """

    def __init__(
        self, torch: Any, cfg: TrainConfig, y_train: Any, n_classes: int, deferral: Deferral | None
    ) -> None:
        self.torch, self.cfg, self.deferral = torch, cfg, deferral
        self.kind = "deferral" if deferral is not None else cfg.loss
        self.counts = torch.bincount(y_train, minlength=n_classes).clamp(min=1).float()
        self.class_weight = (
            len(y_train) / (n_classes * self.counts) if cfg.class_balance == "weights" else None
        )
        if deferral is not None:
            self.t_train = torch.tensor(deferral.p_large_train, dtype=torch.float32)
            self.t_val = torch.tensor(deferral.p_large_val, dtype=torch.float32)
        self._ce: Any = None

    def check_augment(self, augment: BatchAugment) -> None:
        """MixUp/CutMix give soft labels, which only cross-entropy without a deferral gate takes."""
        if augment.soft_labels and self.kind != "ce":
            from roadwork.errors import ConfigError

            raise ConfigError(
                f"train.mixup/train.cutmix mix labels, which train.loss={self.cfg.loss!r}"
                f"{' with a learned deferral gate' if self.deferral is not None else ''} cannot take; set "
                "train.mixup=0 train.cutmix=0, or train.loss=ce without deferral."
            )

    def train(self, z: Any, y: Any, idx: Any, fabric: Any) -> Any:
        """The loss of one training step on logits ``z`` of images ``idx``."""
        from roadwork.models.losses import deferral_loss, gatekeeper_loss

        if self.kind == "deferral":
            assert self.deferral is not None
            return deferral_loss(z, y, fabric.to_device(self.t_train[idx]), self.deferral.cost)
        if self.kind == "gatekeeper":
            return gatekeeper_loss(z, y, self.cfg.gatekeeper_alpha)
        if self._ce is None:
            w = None if self.class_weight is None else fabric.to_device(self.class_weight)
            self._ce = self.torch.nn.CrossEntropyLoss(weight=w, label_smoothing=self.cfg.label_smoothing)
        return self._ce(z, y)

    def validate(self, z: Any, y: Any) -> Any:
        """The validation loss on every val image (CPU logits): the quantity early stopping watches."""
        from roadwork.models.losses import deferral_loss, gatekeeper_loss

        if self.kind == "deferral":
            assert self.deferral is not None
            return deferral_loss(z, y, self.t_val, self.deferral.cost)
        if self.kind == "gatekeeper":
            return gatekeeper_loss(z, y, self.cfg.gatekeeper_alpha)
        return self.torch.nn.functional.cross_entropy(z, y)


# ------------------------------------------------------------------------------- the steps of one run

# named parts of a checkpoint's tensors
_MODEL, _EMA, _BEST = "model.", "ema.", "best."
_RNG_TORCH, _RNG_GEN = "rng.torch", "rng.gen"


def _prefixed(prefix: str, state: dict[str, Any]) -> dict[str, Any]:
    return {prefix + k: v for k, v in state.items()}


def _unprefixed(prefix: str, tensors: dict[str, Any]) -> dict[str, Any]:
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}


@dataclass
class _Run:
    """What the steps of one training run share."""

    fabric: Any
    torch: Any
    model_cfg: ModelConfig
    cfg: TrainConfig
    classes: list[str]
    spec: PreprocessSpec
    card: ModelCard
    net: Any = None  # the network as built (before adapters)
    train_net: Any = None  # with adapters: what is optimised and saved
    model: Any = None  # train_net set up by Fabric (compiled, wrapped, sharded)
    opt: Any = None
    sched: Any = None
    ema: Any = None
    objective: Any = None
    augment: Any = None
    gen: Any = None
    x_train: Any = None
    x_val: Any = None
    y_train: Any = None
    y_val: Any = None
    val_labels: Any = None
    sample_weight: Any = None
    steps_per_epoch: int = 0
    fsdp: bool = False
    fingerprint: str = ""
    checkpoint_dir: Path | None = None
    progress: bool = False
    # the state of early stopping
    best_loss: float = math.inf
    best_state: dict[str, Any] | None = None
    stale: int = 0
    start: int = 0

    @property
    def keep(self) -> Any:
        """The weights that are validated and kept: the EMA's when there is one."""
        return self.train_net if self.ema is None else self.ema.module

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.fabric.world_size  # each process takes batch_size images of it

    @property
    def n_outputs(self) -> int:
        return len(self.classes) + (self.objective is not None and self.objective.deferral is not None)


def _build(
    run: _Run, deferral: Deferral | None, init_weights: Path | None, init_backbone: Path | None
) -> None:
    """Step 1, build: the network (from ``init_weights`` or ``init_backbone`` when given) and its card."""
    net, spec = create_model(run.model_cfg, len(run.classes) + (deferral is not None))
    st: Any = require("safetensors.torch") if init_weights is not None or init_backbone is not None else None
    if init_weights is not None:
        net.load_state_dict(st.load_file(str(init_weights)))  # this very network: every tensor, strictly
    if init_backbone is not None:  # a backbone without the head (ExPLoRA): it must fit, but for the head
        load_weights_into(
            net,
            st.load_file(str(init_backbone)),
            strict=run.model_cfg.strict,
            source=f"backbone {init_backbone}",
        )
    if run.cfg.grad_checkpointing:
        if not hasattr(net, "set_grad_checkpointing"):
            from roadwork.errors import ConfigError

            raise ConfigError(
                f"{run.model_cfg.backbone!r} cannot checkpoint gradients; set train.grad_checkpointing=false."
            )
        net.set_grad_checkpointing(True)
    run.net, run.spec = net, spec
    run.card = ModelCard(
        backbone=run.model_cfg.backbone,
        classes=list(run.classes),
        preprocess=spec,
        drop_rate=run.model_cfg.drop_rate,
        kwargs=card_kwargs(net, run.model_cfg),
        head=run.model_cfg.head,
        pooling=run.model_cfg.pooling,
        gate=deferral is not None,
    )


def _data(
    run: _Run, paths: tuple[Sequence[str], Sequence[str]], labels: tuple[Any, Any], digests: Any
) -> None:
    """Step 2, data: every image decoded once (disk cache, read per batch; or all in RAM) and the labels."""
    torch, cfg = run.torch, run.cfg
    if cfg.cache == "disk" and run.fabric.world_size == 1:  # RSS flat in the number of images
        from roadwork.training.data import build_cache

        run.x_train, run.x_val = (
            build_cache(
                p,
                run.spec,
                cache_dir=cfg.cache_dir,
                workers=cfg.decode_workers,
                digests=sha,
                progress=run.progress,
                desc=f"decoding {name} images",
            )
            for p, sha, name in zip(paths, digests, ("train", "val"), strict=True)
        )
    else:
        run.x_train, run.x_val = (
            torch.from_numpy(load_uint8(p, run.spec, f"loading {name} images", run.progress))
            for p, name in zip(paths, ("train", "val"), strict=True)
        )
    run.y_train = torch.tensor(np.asarray(labels[0]), dtype=torch.long)
    run.y_val = torch.tensor(np.asarray(labels[1]), dtype=torch.long)
    run.val_labels = np.asarray(labels[1])


def _adapt(run: _Run, network: Any) -> Any:
    cfg = run.cfg
    return prepare_finetune(
        network,
        cfg.finetune,
        rank=cfg.lora_rank,
        alpha=cfg.lora_alpha,
        dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules,
    )


def _optimiser(run: _Run, deferral: Deferral | None) -> None:
    """Step 3, set up optimisation: adapters, AdamW (layer-wise LR decay), warmup + cosine, EMA, objective,
    augmentation and the sampling of batches."""
    torch, cfg, fabric = run.torch, run.cfg, run.fabric
    run.train_net = _adapt(run, run.net)
    run.fsdp = fabric.world_size > 1 and cfg.strategy == "fsdp"
    if run.fsdp:  # shard first: the optimizer must hold the sharded parameters
        run.model = fabric.setup_module(run.train_net)
    if cfg.layer_decay is not None:
        groups: Any = _layer_groups(run.train_net, cfg.lr, cfg.layer_decay)
    else:
        groups = [p for p in run.train_net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    run.steps_per_epoch = max(1, math.ceil(len(run.x_train) / run.global_batch))
    updates_per_epoch = math.ceil(run.steps_per_epoch / cfg.accumulate)
    total = updates_per_epoch * cfg.epochs
    run.sched = torch.optim.lr_scheduler.LambdaLR(
        opt, _lr_lambda(total, int(cfg.warmup_epochs * updates_per_epoch))
    )
    if run.fsdp:
        run.opt = fabric.setup_optimizers(opt)
    else:
        to_train = torch.compile(run.train_net, backend=cfg.compile_backend) if cfg.compile else run.train_net
        run.model, run.opt = fabric.setup(to_train, opt)
    run.objective = Objective(torch, cfg, run.y_train, len(run.classes), deferral)
    run.augment = BatchAugment(
        cfg.augment, run.spec, num_classes=len(run.classes), seed=cfg.seed, mixup=cfg.mixup, cutmix=cfg.cutmix
    )
    run.objective.check_augment(run.augment)
    if cfg.class_balance == "sampler":
        run.sample_weight = (1.0 / run.objective.counts)[run.y_train]
    run.gen = torch.Generator().manual_seed(cfg.seed)
    if cfg.ema is not None:
        from torch.optim.swa_utils import AveragedModel

        run.ema = AveragedModel(run.train_net, multi_avg_fn=_ema_warmup_fn(cfg.ema), use_buffers=True)
    # how images are read changes no result: a run resumes across these
    loading = {"workers", "decode_workers", "cache", "cache_dir"}
    run.fingerprint = json.dumps(
        [
            run.model_cfg.model_dump(mode="json"),
            cfg.model_dump(mode="json", exclude=loading),
            len(run.x_train),
        ]
    )


def _epoch_batches(run: _Run, epoch: int) -> Any:
    """The epoch's batches in order: shuffled (or class-balanced draws), this process's share of each."""
    torch, n = run.torch, len(run.x_train)
    if run.sample_weight is None:
        order = torch.randperm(n, generator=run.gen)
    else:  # class-balanced: draw with replacement, every class equally likely
        order = torch.multinomial(run.sample_weight, n, replacement=True, generator=run.gen)
    gb, bs, rank = run.global_batch, run.cfg.batch_size, run.fabric.global_rank
    batches = [order[step * gb : (step + 1) * gb] for step in range(run.steps_per_epoch)]
    if run.fabric.world_size > 1:
        batches = [b[rank * bs : (rank + 1) * bs] for b in batches]
    return _batch_loader(
        torch, run.x_train, run.y_train, batches, run.augment, epoch, run.cfg.workers, run.fabric
    )


def _optimise(run: _Run, epoch: int) -> tuple[float, int]:
    """Step 4, optimise: one epoch of steps; returns (mean train loss, images seen)."""
    cfg, fabric = run.cfg, run.fabric
    run.model.train()
    bar = progress_bar(
        range(run.steps_per_epoch),
        desc=f"epoch {epoch + 1}/{cfg.epochs}",
        unit="batch",
        leave=False,
        disable=not run.progress,
    )
    run_loss, seen = 0.0, 0
    for step, (idx, x, y) in zip(bar, _epoch_batches(run, epoch), strict=True):
        if (
            run.augment.preset == "light"
        ):  # batched tensor ops on the loop's generator, on the device (a GPU's)
            x, y = run.augment(*fabric.to_device((x, y)), epoch=epoch, step=step, gen=run.gen)
        x, y = fabric.to_device((x, y))
        try:
            loss = run.objective.train(run.model(x), y, idx, fabric)
            fabric.backward(loss / cfg.accumulate if cfg.accumulate > 1 else loss)
        except RuntimeError as e:  # torch.OutOfMemoryError is a RuntimeError
            _raise_if_oom(e, cfg)
            raise
        if (step + 1) % cfg.accumulate == 0 or step + 1 == run.steps_per_epoch:
            run.opt.step()
            run.opt.zero_grad(set_to_none=True)
            run.sched.step()
            if run.ema is not None:
                run.ema.update_parameters(run.train_net)
        run_loss += float(loss.detach()) * len(idx)  # a device sync; fine at this batch size
        seen += len(idx)
        if run.progress and (step % 10 == 0 or step + 1 == run.steps_per_epoch):  # formatting costs
            bar.set_postfix(loss=f"{run_loss / seen:.4f}")
    return run_loss / max(seen, 1), seen


def _validate(run: _Run) -> tuple[float, float]:
    """Step 5, validate: (val loss by the objective, val accuracy) of the kept weights; remembers the best."""
    net = run.model if run.ema is None else run.keep
    logits = predict_logits(net, run.x_val, run.spec, batch_size=run.cfg.batch_size, fabric=run.fabric)
    val_loss = float(run.objective.validate(run.torch.from_numpy(logits), run.y_val))
    val_acc = float((logits[:, : len(run.classes)].argmax(1) == run.val_labels).mean())
    return val_loss, val_acc


def _improved(run: _Run, val_loss: float) -> bool:
    if val_loss < run.best_loss - 1e-4:
        run.best_loss, run.stale = val_loss, 0
        run.best_state = {k: v.detach().clone() for k, v in run.keep.state_dict().items()}
        return True
    run.stale += 1
    return False


def _resume(run: _Run, result: TrainResult) -> None:
    """Continue from the checkpoint of this very run, when there is one."""
    if run.fsdp and run.checkpoint_dir is not None:
        log.warning("train.strategy=fsdp writes no resumable checkpoints yet; an interrupted run starts over")
        run.checkpoint_dir = None
    if run.checkpoint_dir is None:
        return
    from roadwork.training.checkpoint import load_checkpoint

    found = load_checkpoint(run.checkpoint_dir, run.fingerprint)
    if found is None:
        return
    tensors, opt_state, meta = found
    run.train_net.load_state_dict(_unprefixed(_MODEL, tensors))
    run.opt.load_state_dict(opt_state)
    run.sched.load_state_dict(meta["scheduler"])
    if run.ema is not None:
        run.ema.load_state_dict(_unprefixed(_EMA, tensors))
    if meta["has_best"]:
        run.best_state = _unprefixed(_BEST, tensors)
    run.torch.set_rng_state(tensors[_RNG_TORCH])
    run.gen.set_state(tensors[_RNG_GEN])
    run.best_loss, run.stale, run.start = meta["best_loss"], meta["stale"], meta["epoch"]
    result.history, result.best_epoch = meta["history"], meta["best_epoch"]
    if run.progress:
        progress_write(f"resuming from the checkpoint after epoch {run.start}")


def _checkpoint(run: _Run, result: TrainResult, epoch: int) -> None:
    """Step 6, checkpoint: everything the next epoch depends on, so a rerun continues identically."""
    if run.checkpoint_dir is None or run.fabric.global_rank != 0:
        return
    from roadwork.training.checkpoint import save_checkpoint

    tensors = _prefixed(_MODEL, run.train_net.state_dict())
    tensors |= _prefixed(_EMA, run.ema.state_dict()) if run.ema is not None else {}
    tensors |= _prefixed(_BEST, run.best_state) if run.best_state is not None else {}
    tensors |= {_RNG_TORCH: run.torch.get_rng_state(), _RNG_GEN: run.gen.get_state()}
    meta = {
        "fingerprint": run.fingerprint,
        "epoch": epoch + 1,
        "history": result.history,
        "best_loss": run.best_loss,
        "best_epoch": result.best_epoch,
        "stale": run.stale,
        "has_best": run.best_state is not None,
        "scheduler": run.sched.state_dict(),
    }
    save_checkpoint(run.checkpoint_dir, tensors=tensors, optimizer=run.opt, meta=meta)


def _finish(run: _Run, result: TrainResult) -> TrainResult:
    """The best epoch's weights, adapters merged (FSDP shards gathered on rank 0): a plain network."""
    for images in (run.x_train, run.x_val):
        if hasattr(images, "close"):
            images.close()  # a temporary cache folder goes with it
    if run.best_state is not None:
        run.train_net.load_state_dict(run.best_state)
    result.trainable_params = count_trainable(run.train_net)  # before merging, which unfreezes the base
    train_net = run.train_net
    if run.fsdp:  # gather the shards (every process takes part) into an ordinary network on rank 0
        from roadwork.training.fsdp import full_state_dict

        state = full_state_dict(train_net)
        train_net = _adapt(run, create_model(run.model_cfg, run.n_outputs)[0])
        if run.fabric.global_rank == 0:  # the full state reaches rank 0 only (it alone saves the model)
            train_net.load_state_dict(state)
    result.model = merge_adapters(train_net).eval()  # adapters folded in: a plain timm model is saved
    return result


def _train(
    fabric: Any,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    *,
    classes: list[str],
    train_paths: Sequence[str],
    train_labels: np.ndarray,
    val_paths: Sequence[str],
    val_labels: np.ndarray,
    on_epoch: Callable[[int, dict[str, float]], None] | None,
    progress: bool,
    checkpoint_dir: Path | None,
    init_weights: Path | None = None,
    deferral: Deferral | None = None,
    init_backbone: Path | None = None,
    digests: tuple[Sequence[str] | None, Sequence[str] | None] = (None, None),
) -> TrainResult:
    """One run in this process, top to bottom: build → data → optimise → validate → checkpoint, per epoch."""
    torch = require("torch")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    require("lightning_fabric").seed_everything(cfg.seed, verbose=False)
    run = _Run(fabric, torch, model_cfg, cfg, list(classes), PreprocessSpec(size=model_cfg.image_size), None)  # type: ignore[arg-type]
    run.progress, run.checkpoint_dir = progress and fabric.global_rank == 0, checkpoint_dir
    _build(run, deferral, init_weights, init_backbone)
    _data(run, (train_paths, val_paths), (train_labels, val_labels), digests)
    _optimiser(run, deferral)
    result = TrainResult(model=run.net, card=run.card)
    _resume(run, result)
    for epoch in range(run.start, cfg.epochs):
        t0 = time.perf_counter()
        train_loss, seen = _optimise(run, epoch)
        train_time = time.perf_counter() - t0
        val_loss, val_acc = _validate(run)
        row = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "val_accuracy": val_acc,
            "lr": float(run.sched.get_last_lr()[0]),
            "train_images_per_s": seen / train_time,
            "seconds": time.perf_counter() - t0,
        }
        result.history.append(row)
        if _improved(run, val_loss):
            result.best_epoch = epoch + 1
        _checkpoint(run, result, epoch)
        if on_epoch is not None:
            on_epoch(epoch + 1, row)
        if run.progress:
            progress_write(
                f"epoch {epoch + 1:>3}  train_loss {train_loss:.4f}  val_loss {val_loss:.4f}  "
                f"val_acc {val_acc:.4f}  {row['train_images_per_s']:.0f} img/s"
            )
        if run.stale >= cfg.patience:
            if run.progress:
                progress_write(f"early stopping: val_loss has not improved for {cfg.patience} epochs")
            break
    return _finish(run, result)


def _rows(torch: Any, images: Any, idx: Any) -> Any:
    """uint8 rows ``idx`` (a tensor) of an in-memory tensor or a :class:`~roadwork.training.data.DiskImages`."""
    if isinstance(images, torch.Tensor):
        return images[idx]
    return torch.from_numpy(images[idx.numpy()])


class _StepBatches:
    """One item per training step: (indices, network input, labels), augmented here unless the preset is ``light``
    (then the uint8 images: ``light`` stays in the loop, on its generator). Augmentation is seeded per
    (seed, epoch, step), so any number of DataLoader workers gives the same batches as none."""

    def __init__(self, images: Any, labels: Any, batches: list[Any], augment: Any, epoch: int) -> None:
        self.images, self.labels = images, labels  # no module attributes: spawned workers pickle this
        self.batches, self.augment, self.epoch = batches, augment, epoch

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, step: int) -> tuple[Any, Any, Any]:
        torch = require("torch")
        idx = self.batches[step]
        u8, y = _rows(torch, self.images, idx), self.labels[idx]
        if self.augment.preset == "light":
            return idx, u8, y  # the loop augments it
        x, y = self.augment(u8, y, epoch=self.epoch, step=step)
        return idx, x, y


def _batch_loader(
    torch: Any,
    images: Any,
    labels: Any,
    batches: list[Any],
    augment: Any,
    epoch: int,
    workers: int,
    fabric: Any,
) -> Any:
    """The epoch's batches: read (and augmented) in this process with ``workers=1``, else by a DataLoader with
    that many worker processes (0: one per core), pinned memory on CUDA, a few batches ahead."""
    ds = _StepBatches(images, labels, batches, augment, epoch)
    n = resolve_workers(workers)
    if n <= 1 or len(batches) < 2:
        return (ds[i] for i in range(len(ds)))
    return torch.utils.data.DataLoader(
        ds,
        batch_size=None,
        shuffle=False,
        num_workers=min(n, len(batches)),
        pin_memory=getattr(fabric.device, "type", "cpu") == "cuda",
        prefetch_factor=2,
    )


def predict_logits(
    model: Any, images_u8: Any, spec: PreprocessSpec, *, batch_size: int = 256, fabric: Any = None
) -> np.ndarray:
    """Logits (float64, shape (N, K)) for uint8 images of shape (N, size, size, 3) (array or tensor)."""
    torch = require("torch")
    u8 = torch.from_numpy(images_u8) if isinstance(images_u8, np.ndarray) else images_u8  # or DiskImages
    was_training = model.training
    model.eval()
    outs = []
    with torch.inference_mode():
        for i in range(0, len(u8), batch_size):
            rows = u8[i : i + batch_size]
            x = to_input(torch, rows if isinstance(rows, torch.Tensor) else torch.from_numpy(rows), spec)
            if fabric is not None:
                x = fabric.to_device(x)
            outs.append(model(x).float().cpu().numpy())
    model.train(was_training)
    if not outs:
        return np.zeros((0, int(getattr(model, "num_classes", 0))))
    return np.concatenate(outs).astype(np.float64)


def save_history(history: list[dict[str, float]], path: Path) -> None:
    """Write the per-epoch rows to ``history.json``."""
    path.write_text(json.dumps(history, indent=2))
