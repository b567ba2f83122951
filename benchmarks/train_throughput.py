"""Training throughput: roadwork's training loop vs a plain hand-written PyTorch loop, same model, same data.

    python benchmarks/train_throughput.py [--backbone test_vit] [--size 64] [--n 512] [--batch 32]

For each fine-tuning mode (linear probe, LoRA, DoRA, DoRAN, full) both loops train the same model (same seed, same
adapters) on the same uint8 images with the same augmentation, AdamW and warmup+cosine schedule; images/s
counts only the optimisation steps (roadwork's per-epoch ``train_images_per_s``; the plain loop's wall time
over the same number of steps); the two loops alternate ``--repeats`` times and each row shows the best epoch of
each (this machine is shared and noisy). The last rows compare fp32 with
bf16 autocast and eager with ``torch.compile`` (inductor) for full fine-tuning; the compile itself falls in the
first epoch, which the best-epoch rule leaves out (on CPU, bf16 helps only where the CPU has bf16 units).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from roadwork.config import ModelConfig, TrainConfig
from roadwork.data.preprocess import PreprocessSpec
from roadwork.models.adapters import prepare_finetune
from roadwork.models.factory import create_model
from roadwork.training.loop import _augment, _lr_lambda, _to_input, train_model


def _images(d: Path, n: int, size: int) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = d / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


def _plain(model_cfg: ModelConfig, cfg: TrainConfig, u8: torch.Tensor, y: torch.Tensor) -> float:
    """The loop a practitioner would write by hand, doing the same work per step."""
    torch.manual_seed(cfg.seed)
    net, _ = create_model(model_cfg, 2)
    net = prepare_finetune(net, cfg.finetune, rank=cfg.lora_rank, alpha=cfg.lora_alpha)
    net.train()
    fwd = torch.compile(net) if cfg.compile else net
    spec = PreprocessSpec(size=model_cfg.image_size)
    opt = torch.optim.AdamW(
        [p for p in net.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    steps = math.ceil(len(u8) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps * cfg.epochs, steps // 2))
    gen = torch.Generator().manual_seed(cfg.seed)
    loss_fn = torch.nn.CrossEntropyLoss()
    best = 0.0
    for _ in range(cfg.epochs):
        order = torch.randperm(len(u8), generator=gen)
        t0, seen = time.perf_counter(), 0
        for s in range(steps):
            idx = order[s * cfg.batch_size : (s + 1) * cfg.batch_size]
            x = _augment(torch, _to_input(torch, u8[idx], spec), gen)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision == "bf16-mixed"):
                loss = loss_fn(fwd(x), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen += len(idx)
            float(loss.detach())  # the same per-step sync the roadwork loop does for its progress bar
        best = max(best, seen / (time.perf_counter() - t0))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="test_vit")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument(
        "--repeats", type=int, default=3, help="alternate the two loops this many times; best of each"
    )
    args = ap.parse_args()
    kwargs = {"img_size": args.size} if "vit" in args.backbone else {}
    model_cfg = ModelConfig(backbone=args.backbone, image_size=args.size, drop_rate=0.0, kwargs=kwargs)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        paths = _images(Path(d), args.n, args.size)
        labels = np.arange(args.n) % 2
        u8 = torch.from_numpy(np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths]))
        y = torch.tensor(labels, dtype=torch.long)
        runs = [(m, "32-true", False) for m in ("linear_probe", "lora", "dora", "doran", "full")]
        runs += [("full", "bf16-mixed", False), ("full", "32-true", True)]
        for mode, precision, compiled in runs:
            cfg = TrainConfig(
                compile=compiled,
                finetune=mode,
                epochs=args.epochs,
                batch_size=args.batch,
                lr=1e-3,
                patience=args.epochs,
                augment=True,
                precision=precision,
                accelerator="cpu",
                warmup_epochs=0.5,
            )
            ours, plain, trainable = 0.0, 0.0, 0
            for _ in range(args.repeats):  # alternate; the first round also warms the process up for both
                res = train_model(
                    model_cfg,
                    cfg,
                    classes=["a", "b"],
                    train_paths=paths,
                    train_labels=labels,
                    val_paths=paths[:32],
                    val_labels=labels[:32],
                    progress=False,
                )
                ours = max(ours, *(r["train_images_per_s"] for r in res.history))
                trainable = res.trainable_params
                plain = max(plain, _plain(model_cfg, cfg, u8, y))
            rows.append((mode + (", compiled" if compiled else ""), precision, trainable, ours, plain))
    total = rows[4][2]
    print(
        f"{args.backbone} @ {args.size}px, {args.n} images, batch {args.batch}, best epoch of {args.repeats}x{args.epochs}, "
        f"{torch.get_num_threads()} threads\n"
    )
    print("| mode | precision | trainable params | roadwork img/s | plain loop img/s | roadwork / plain |")
    print("|---|---|---:|---:|---:|---:|")
    for mode, prec, params, ours, plain in rows:
        print(
            f"| {mode} | {prec} | {params:,} ({params / total:.1%}) | {ours:.1f} | {plain:.1f} | {ours / plain:.2f} |"
        )


if __name__ == "__main__":
    main()
