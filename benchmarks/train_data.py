"""Training data beyond RAM: peak RSS and speed of the train loop's data path with the decoded images in RAM vs
in the disk cache (``train.cache=memory|disk``), at two dataset sizes, side by side in one run.

    python benchmarks/train_data.py [--sizes 6000,60000] [--image 96] [--batch 64] [--workers 1] [--augment light]

Each row is a fresh Python process (so peak RSS, ``ru_maxrss``, is that run's alone, torch imported in all)
running exactly what ``training.loop._train`` runs for its data, on N generated 128x128 JPEGs: decode and resize
to ``--image`` (``load_uint8`` into RAM, or ``build_cache`` into a file; ``decode s``), then one epoch of
shuffled batches through ``_batch_loader`` and the augmentation preset (``batches img/s``), without a model: the
model's memory does not depend on N, and on 2 shared cores a model epoch over 60k images takes longer than this
benchmark may. ``disk, reused`` runs again on the same ``train.cache_dir``: nothing is decoded.

    python benchmarks/train_data.py --train [--sizes 6000,60000] [--epochs 1]

``--train`` measures the train stage itself instead: each row is a fresh process running ``train_model`` with the
demo model (``configs/demo.yaml``) for ``--epochs`` epochs (10 % of the images for validation) and reports its
peak RSS (with ``--repeats R``: the median of R fresh processes and their range), the seconds outside the optimisation steps (``other s``: decode, validation, set-up) and the best
epoch's training img/s (at the demo's 96 px; ``--image`` is not used).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

CHILD = r"""
import json, resource, sys, time
import numpy as np
import torch
from roadwork.data.preprocess import PreprocessSpec
from roadwork.training.augment import BatchAugment
from roadwork.training.data import build_cache
from roadwork.training.loop import _batch_loader, load_uint8
args = json.loads(sys.argv[1])
paths = open(args["list"]).read().splitlines()
labels = torch.as_tensor(np.arange(len(paths)) % 2)
spec = PreprocessSpec(size=args["image"])
t0 = time.perf_counter()
if args["cache"] == "disk":  # what _train does for train.cache=disk / memory
    images = build_cache(paths, spec, cache_dir=args["cache_dir"], workers=args["decode_workers"])
else:
    images = torch.from_numpy(load_uint8(paths, spec, progress=False))
t1 = time.perf_counter()
order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(0))
batches = [order[i : i + args["batch"]] for i in range(0, len(paths), args["batch"])]
aug = BatchAugment(args["augment"], spec, num_classes=2, seed=0)
gen = torch.Generator().manual_seed(0)
checksum = 0.0
for step, (idx, x, y) in enumerate(_batch_loader(torch, images, labels, batches, aug, 0, args["workers"], None)):
    if aug.preset == "light":
        x, y = aug(x, y, epoch=0, step=step, gen=gen)
    checksum += float(x[:, 0, 0, 0].sum())
t2 = time.perf_counter()
print(json.dumps({"seconds": t1 - t0, "img_s": len(paths) / (t2 - t1),
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


TRAIN_CHILD = r"""
import json, resource, sys, time
import numpy as np
from roadwork.config import TrainConfig, load_config
from roadwork.training.loop import train_model
args = json.loads(sys.argv[1])
paths = open(args["list"]).read().splitlines()
labels = np.arange(len(paths)) % 2
n_val = len(paths) // 10
cfg = TrainConfig(epochs=args["epochs"], batch_size=args["batch"], patience=args["epochs"], accelerator="cpu",
                  cache=args["cache"], cache_dir=args["cache_dir"], workers=args["workers"],
                  decode_workers=args["decode_workers"], augment=args["augment"])
t0 = time.perf_counter()
res = train_model(load_config("demo").model, cfg, classes=["a", "b"], train_paths=paths[n_val:],
                  train_labels=labels[n_val:], val_paths=paths[:n_val], val_labels=labels[:n_val], progress=False)
wall = time.perf_counter() - t0
train_s = sum(len(paths[n_val:]) / h["train_images_per_s"] for h in res.history)
print(json.dumps({"seconds": wall - train_s, "img_s": max(h["train_images_per_s"] for h in res.history),
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _machine() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name"):
                return f"machine: {line.split(':', 1)[1].strip()}; {os.cpu_count()} cores"
    except (OSError, subprocess.SubprocessError):
        pass
    return f"machine: unknown; {os.cpu_count()} cores"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="6000,60000")
    ap.add_argument("--image", type=int, default=96)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--augment", default="light")
    ap.add_argument("--workers", type=int, default=1, help="train.workers: DataLoader processes for batches")
    ap.add_argument(
        "--decode-workers",
        type=int,
        default=0,
        help="train.decode_workers: cache-filling processes (0: per core)",
    )
    ap.add_argument("--train", action="store_true", help="run train_model with the demo model (see above)")
    ap.add_argument("--epochs", type=int, default=1, help="--train: epochs")
    ap.add_argument(
        "--repeats", type=int, default=1, help="fresh processes per row; medians (and the range) shown"
    )
    ap.add_argument(
        "--modes", default="memory,disk,dir,reused", help="rows to run, of memory,disk,dir,reused"
    )
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(_machine())
    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(64):  # 64 distinct JPEGs, written under N names (decoding costs the same)
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
        blobs.append(buf.getvalue())
    with tempfile.TemporaryDirectory(prefix="roadwork-bench-") as tmp:
        root = Path(tmp)
        what = f"train_model, demo model, {args.epochs} epoch(s)" if args.train else "data path only"
        speed = "train img/s" if args.train else "batches img/s"
        print(f"{what}; decode_workers={args.decode_workers}, workers={args.workers}, augment={args.augment}")
        print(
            f"\n{'images':>7} {'cache':>13} {'peak RSS MB':>12} {'range':>11} {'other s' if args.train else 'decode s':>9} {speed:>14}"
        )
        print("-" * 71)
        for n in sizes:
            d = root / f"n{n}"
            d.mkdir()
            paths = []
            for i in range(n):
                p = d / f"{i}.jpg"
                p.write_bytes(blobs[i % len(blobs)])
                paths.append(str(p))
            listing = root / f"n{n}.txt"
            listing.write_text("\n".join(paths))
            cache_dir = str(root / f"cache{n}")
            rows = {
                "memory": ("memory", "memory", None),
                "disk": ("disk", "disk", None),
                "dir": ("disk (dir)", "disk", cache_dir),
                "reused": ("disk, reused", "disk", cache_dir),
            }
            for label, cache, cdir in (rows[m] for m in args.modes.split(",")):
                spec = {
                    "list": str(listing),
                    "image": args.image,
                    "batch": args.batch,
                    "cache": cache,
                    "cache_dir": cdir,
                    "workers": args.workers,
                    "decode_workers": args.decode_workers,
                    "augment": args.augment,
                    "epochs": args.epochs,
                }
                runs = []
                for _ in range(args.repeats):  # peak RSS varies run to run by ~100 MB here: report the spread
                    out = subprocess.run(
                        [sys.executable, "-c", TRAIN_CHILD if args.train else CHILD, json.dumps(spec)],
                        capture_output=True,
                        text=True,
                        check=True,
                    ).stdout
                    runs.append(json.loads(out.strip().splitlines()[-1]))
                rss = sorted(r["rss_mb"] for r in runs)
                spread = f"{rss[0]:.0f}-{rss[-1]:.0f}" if len(rss) > 1 else ""
                print(
                    f"{n:>7} {label:>13} {statistics.median(rss):>12.0f} {spread:>11} "
                    f"{statistics.median(r['seconds'] for r in runs):>9.1f} "
                    f"{statistics.median(r['img_s'] for r in runs):>14.0f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
