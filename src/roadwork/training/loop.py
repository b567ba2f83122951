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
from roadwork._progress import progress_bar, progress_write
from roadwork.config import ModelConfig, TrainConfig
from roadwork.data.preprocess import PreprocessSpec, load_resized
from roadwork.models.adapters import count_trainable, merge_adapters, prepare_finetune
from roadwork.models.factory import ModelCard, card_kwargs, create_model
from roadwork.training.augment import BatchAugment, light_augment

__all__ = ["Deferral", "TrainResult", "load_uint8", "predict_logits", "train_model"]


@dataclass
class TrainResult:
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


def _to_input(torch: Any, u8: Any, spec: PreprocessSpec) -> Any:
    """(B, H, W, 3) uint8 tensor → normalised (B, 3, H, W) float32, same arithmetic as preprocess.to_float."""
    x = u8.permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


_augment = light_augment  # the name benchmarks/train_throughput.py imports


def _lr_lambda(total: int, warmup: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return f


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
    without the head, e.g. from ExPLoRA, when given); with ``checkpoint_dir``, save a resumable checkpoint after every epoch and resume from one of the
    same configuration (model, optimizer, scheduler, EMA, best weights, RNG: the next step is identical).

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
        strategy: Any = (
            "ddp_spawn"  # processes started here: it works from Python, the CLI and notebooks alike
        )
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
        import tempfile

        from roadwork.models.heads import build_network

        with tempfile.TemporaryDirectory(prefix="roadwork-ddp-") as tmp:
            weights_file = Path(tmp) / "model.safetensors"
            card_d, history, best, trainable = fabric.launch(
                _train_payload, model_cfg, cfg, weights_file=weights_file, **kwargs
            )
            weights = require("safetensors.torch").load_file(str(weights_file))

        card = ModelCard.from_dict(card_d)
        model = build_network(
            card.backbone,
            len(card.classes) + card.gate,
            drop_rate=card.drop_rate,
            kwargs=card.kwargs,
            head=card.head,
            pooling=card.pooling,
        )
        model.load_state_dict(weights)
        result = TrainResult(model.eval(), card, history, best, trainable)
        if on_epoch is not None:
            for row in result.history:
                on_epoch(int(row["epoch"]), row)
        return result
    fabric = fabric_mod.Fabric(accelerator=cfg.accelerator, devices=1, precision=cfg.precision)
    return _train(fabric, model_cfg, cfg, on_epoch=on_epoch, **kwargs)


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
    torch = require("torch")
    fabric_mod = require("lightning_fabric")

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    fabric_mod.seed_everything(cfg.seed, verbose=False)
    world, rank = fabric.world_size, fabric.global_rank
    progress = progress and rank == 0

    net, spec = create_model(model_cfg, len(classes) + (deferral is not None))
    if init_weights is not None:
        net.load_state_dict(require("safetensors.torch").load_file(str(init_weights)))
    if init_backbone is not None:
        state = require("safetensors.torch").load_file(str(init_backbone))
        own = net.state_dict()
        prefix = "" if any(k in own for k in state) else "backbone."  # a PooledClassifier wraps the backbone
        net.load_state_dict(
            {
                prefix + k: v
                for k, v in state.items()
                if own.get(prefix + k) is not None and own[prefix + k].shape == v.shape
            },
            strict=False,
        )
    card = ModelCard(
        backbone=model_cfg.backbone,
        classes=list(classes),
        preprocess=spec,
        drop_rate=model_cfg.drop_rate,
        kwargs=card_kwargs(net, model_cfg),
        head=model_cfg.head,
        pooling=model_cfg.pooling,
        gate=deferral is not None,
    )
    x_train: Any
    x_val: Any
    if cfg.cache == "disk" and world == 1:  # decoded once into a file, read per batch: RSS flat in N
        from roadwork.training.data import build_cache

        x_train, x_val = (
            build_cache(
                paths,
                spec,
                cache_dir=cfg.cache_dir,
                workers=cfg.workers,
                digests=sha,
                progress=progress,
                desc=desc,
            )
            for paths, sha, desc in (
                (train_paths, digests[0], "decoding train images"),
                (val_paths, digests[1], "decoding val images"),
            )
        )
    else:
        x_train = torch.from_numpy(load_uint8(train_paths, spec, "loading train images", progress))
        x_val = torch.from_numpy(load_uint8(val_paths, spec, "loading val images", progress))
    y_train = torch.tensor(np.asarray(train_labels), dtype=torch.long)
    y_val = torch.tensor(np.asarray(val_labels), dtype=torch.long)

    if cfg.grad_checkpointing:
        if not hasattr(net, "set_grad_checkpointing"):
            from roadwork.errors import ConfigError

            raise ConfigError(
                f"{model_cfg.backbone!r} cannot checkpoint gradients; set train.grad_checkpointing=false."
            )
        net.set_grad_checkpointing(True)

    def adapt(network: Any) -> Any:
        return prepare_finetune(
            network,
            cfg.finetune,
            rank=cfg.lora_rank,
            alpha=cfg.lora_alpha,
            dropout=cfg.lora_dropout,
            target_modules=cfg.target_modules,
        )

    train_net = adapt(net)
    fsdp = world > 1 and cfg.strategy == "fsdp"
    if fsdp:  # shard first: the optimizer must hold the sharded parameters
        model = fabric.setup_module(train_net)
    if cfg.layer_decay is not None:
        groups: Any = _layer_groups(train_net, cfg.lr, cfg.layer_decay)
    else:
        groups = [p for p in train_net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    global_batch = (
        cfg.batch_size * world
    )  # each process takes its own batch_size images of every global batch
    steps_per_epoch = max(1, math.ceil(len(x_train) / global_batch))
    updates_per_epoch = math.ceil(steps_per_epoch / cfg.accumulate)
    total = updates_per_epoch * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, _lr_lambda(total, int(cfg.warmup_epochs * updates_per_epoch))
    )
    if fsdp:
        opt = fabric.setup_optimizers(opt)
    else:
        to_train = torch.compile(train_net, backend=cfg.compile_backend) if cfg.compile else train_net
        model, opt = fabric.setup(to_train, opt)
    counts = torch.bincount(y_train, minlength=len(classes)).clamp(min=1).float()
    class_weight = (len(y_train) / (len(classes) * counts)) if cfg.class_balance == "weights" else None
    loss_fn: Any = torch.nn.CrossEntropyLoss(
        weight=None if class_weight is None else fabric.to_device(class_weight),
        label_smoothing=cfg.label_smoothing,
    )
    val_loss_fn: Any = torch.nn.functional.cross_entropy
    if cfg.loss == "gatekeeper":
        from roadwork.models.losses import gatekeeper_loss

        def loss_fn(z: Any, y: Any) -> Any:
            return gatekeeper_loss(z, y, cfg.gatekeeper_alpha)

        val_loss_fn = loss_fn  # the best epoch is the best one by the objective being trained
    if deferral is not None:
        from roadwork.models.losses import deferral_loss

        t_train = torch.tensor(deferral.p_large_train, dtype=torch.float32)
        t_val = torch.tensor(deferral.p_large_val, dtype=torch.float32)

        def val_loss_fn(z: Any, y: Any) -> Any:
            return deferral_loss(z, y, t_val, deferral.cost)

    augment = BatchAugment(
        cfg.augment, spec, num_classes=len(classes), seed=cfg.seed, mixup=cfg.mixup, cutmix=cfg.cutmix
    )
    if augment.soft_labels and (cfg.loss != "ce" or deferral is not None):
        from roadwork.errors import ConfigError

        raise ConfigError(
            f"train.mixup/train.cutmix mix labels, which train.loss={cfg.loss!r}"
            f"{' with a learned deferral gate' if deferral is not None else ''} cannot take; set "
            "train.mixup=0 train.cutmix=0, or train.loss=ce without deferral."
        )
    sample_weight = (1.0 / counts)[y_train] if cfg.class_balance == "sampler" else None
    gen = torch.Generator().manual_seed(cfg.seed)
    ema = None
    if cfg.ema is not None:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(train_net, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True)
    keep = train_net if ema is None else ema.module  # the weights that are validated and kept

    result = TrainResult(model=net, card=card)
    best_loss, best_state, stale, start = math.inf, None, 0, 0
    loading = {"workers", "cache", "cache_dir"}  # how images are read changes no result: resume across them
    fingerprint = json.dumps(
        [model_cfg.model_dump(mode="json"), cfg.model_dump(mode="json", exclude=loading), len(x_train)]
    )
    if fsdp and checkpoint_dir is not None:
        log.warning("train.strategy=fsdp writes no resumable checkpoints yet; an interrupted run starts over")
        checkpoint_dir = None
    if checkpoint_dir is not None:
        from roadwork.training.checkpoint import load_checkpoint

        found = load_checkpoint(checkpoint_dir, fingerprint)
        if found is not None:
            tensors, opt_state, meta = found
            train_net.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
            opt.load_state_dict(opt_state)
            sched.load_state_dict(meta["scheduler"])
            if ema is not None:
                ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
            if meta["has_best"]:
                best_state = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
            torch.set_rng_state(tensors["rng.torch"])
            gen.set_state(tensors["rng.gen"])
            best_loss, stale, start = meta["best_loss"], meta["stale"], meta["epoch"]
            result.history, result.best_epoch = meta["history"], meta["best_epoch"]
            if progress:
                progress_write(f"resuming from the checkpoint after epoch {start}")
    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        model.train()
        if sample_weight is None:
            order = torch.randperm(len(x_train), generator=gen)
        else:  # class-balanced: draw with replacement, every class equally likely
            order = torch.multinomial(sample_weight, len(x_train), replacement=True, generator=gen)
        bar = progress_bar(
            range(steps_per_epoch),
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            unit="batch",
            leave=False,
            disable=not progress,
        )
        run_loss, seen = 0.0, 0
        batches = [order[step * global_batch : (step + 1) * global_batch] for step in range(steps_per_epoch)]
        if world > 1:
            batches = [b[rank * cfg.batch_size : (rank + 1) * cfg.batch_size] for b in batches]
        loader = _batch_loader(torch, x_train, y_train, batches, augment, epoch, cfg.workers, fabric)
        for step, (idx, x, y) in zip(bar, loader, strict=True):
            if augment.preset == "light":  # batched tensor ops on the loop's generator, here as always
                x, y = augment(x, y, epoch=epoch, step=step, gen=gen)
            x, y = fabric.to_device((x, y))
            try:
                if deferral is None:
                    loss = loss_fn(model(x), y)
                else:
                    loss = deferral_loss(model(x), y, fabric.to_device(t_train[idx]), deferral.cost)
                fabric.backward(loss / cfg.accumulate if cfg.accumulate > 1 else loss)
            except RuntimeError as e:  # torch.OutOfMemoryError is a RuntimeError
                _raise_if_oom(e, cfg)
                raise
            if (step + 1) % cfg.accumulate == 0 or step + 1 == steps_per_epoch:
                opt.step()
                opt.zero_grad(set_to_none=True)
                sched.step()
                if ema is not None:
                    ema.update_parameters(train_net)
            run_loss += float(loss.detach()) * len(idx)  # a device sync; fine at this batch size
            seen += len(idx)
            if progress and (step % 10 == 0 or step + 1 == steps_per_epoch):  # formatting costs on tiny steps
                bar.set_postfix(loss=f"{run_loss / seen:.4f}")
        train_time = time.perf_counter() - t0
        val_logits = predict_logits(
            model if ema is None else keep, x_val, spec, batch_size=256, fabric=fabric
        )
        val_loss = float(val_loss_fn(torch.from_numpy(val_logits), y_val))
        val_acc = float((val_logits[:, : len(classes)].argmax(1) == val_labels).mean())
        row = {
            "epoch": epoch + 1,
            "train_loss": run_loss / max(seen, 1),
            "val_loss": val_loss,
            "val_accuracy": val_acc,
            "lr": float(sched.get_last_lr()[0]),
            "train_images_per_s": seen / train_time,
            "seconds": time.perf_counter() - t0,
        }
        result.history.append(row)
        if val_loss < best_loss - 1e-4:
            best_loss, stale, result.best_epoch = val_loss, 0, epoch + 1
            best_state = {k: v.detach().clone() for k, v in keep.state_dict().items()}
        else:
            stale += 1
        if checkpoint_dir is not None and rank == 0:
            from roadwork.training.checkpoint import save_checkpoint

            tensors = {f"model.{k}": v for k, v in train_net.state_dict().items()}
            tensors |= {f"ema.{k}": v for k, v in ema.state_dict().items()} if ema is not None else {}
            tensors |= {f"best.{k}": v for k, v in best_state.items()} if best_state is not None else {}
            tensors |= {"rng.torch": torch.get_rng_state(), "rng.gen": gen.get_state()}
            save_checkpoint(
                checkpoint_dir,
                tensors=tensors,
                optimizer=opt,
                meta={
                    "fingerprint": fingerprint,
                    "epoch": epoch + 1,
                    "history": result.history,
                    "best_loss": best_loss,
                    "best_epoch": result.best_epoch,
                    "stale": stale,
                    "has_best": best_state is not None,
                    "scheduler": sched.state_dict(),
                },
            )
        if on_epoch is not None:
            on_epoch(epoch + 1, row)
        if progress:
            progress_write(
                f"epoch {epoch + 1:>3}  train_loss {row['train_loss']:.4f}  val_loss {val_loss:.4f}  "
                f"val_acc {val_acc:.4f}  {row['train_images_per_s']:.0f} img/s"
            )
        if stale >= cfg.patience:
            if progress:
                progress_write(f"early stopping: val_loss has not improved for {cfg.patience} epochs")
            break
    for images in (x_train, x_val):
        if hasattr(images, "close"):
            images.close()  # a temporary cache folder goes with it
    if best_state is not None:
        train_net.load_state_dict(best_state)
    result.trainable_params = count_trainable(train_net)  # before merging, which unfreezes the base
    if fsdp:  # gather the shards (every process takes part) into an ordinary network on rank 0
        from roadwork.training.fsdp import full_state_dict

        state = full_state_dict(train_net)
        train_net = adapt(create_model(model_cfg, len(classes) + (deferral is not None))[0])
        if rank == 0:  # the full state reaches rank 0 only (it alone saves the model); the others drop theirs
            train_net.load_state_dict(state)
    result.model = merge_adapters(train_net).eval()  # adapters folded in: a plain timm model is saved
    return result


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
    import os

    ds = _StepBatches(images, labels, batches, augment, epoch)
    n = (os.cpu_count() or 1) if workers == 0 else workers
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
            x = _to_input(torch, rows if isinstance(rows, torch.Tensor) else torch.from_numpy(rows), spec)
            if fabric is not None:
                x = fabric.to_device(x)
            outs.append(model(x).float().cpu().numpy())
    model.train(was_training)
    if not outs:
        return np.zeros((0, int(getattr(model, "num_classes", 0))))
    return np.concatenate(outs).astype(np.float64)


def save_history(history: list[dict[str, float]], path: Path) -> None:
    import json

    path.write_text(json.dumps(history, indent=2))
