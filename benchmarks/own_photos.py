"""Your own photos, first contact: the commands a new user types, side by side, on real photos without a hub.

    python benchmarks/own_photos.py [--seeds 0] [--no-ultralytics] [--no-finetune-cpu] [--out runs/own-photos]

Reads ``../shared/data/real-roadwork-mini`` (1,079 photos, 256x256; see its SOURCES.md) in place and exits cleanly
when it is absent. Every roadwork row is the CLI exactly as typed (a subprocess, ``HF_HUB_OFFLINE=1``: no
pretrained weights can be had), its figures read from the run's ``evaluate/metrics.json`` (the exported bundle on
the test split):

- ``roadwork run data.source=PHOTOS model.pretrained=false``: what the offline error now advises (it picks the
  ``scratch`` recipe by itself);
- ``roadwork run default data.source=PHOTOS`` and ``roadwork run demo data.source=PHOTOS``: the presets;
- ``roadwork run finetune-cpu data.source=PHOTOS model.pretrained=false``: what the offline error used to advise
  (ConvNeXt-Atto from random weights), for the record;
- Ultralytics YOLO11n-cls from random weights (``benchmarks/_ultralytics_row.py``; ``pip install ultralytics``,
  the ``yolo`` extra) on the same train/val/test images, for a wall-clock budget equal to the advised row's
  train stage, at the same image size.

Columns: test accuracy, AUROC, the share the certified abstention rule answered on test, the model check's
verdict, and wall seconds (the whole CLI run; for Ultralytics its ``train`` call). With several ``--seeds``
(``train.seed``; Ultralytics' ``seed``) the table shows each run and the mean.

This set separates partly by collection style (its two classes come from different photo collections): read
accuracy here as a smoke test on real JPEGs, not as a measure of roadwork detection.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REAL = HERE.parents[1] / "shared" / "data" / "real-roadwork-mini"


def _cpu() -> str:
    """lscpu's model name and flags (this project's machines alternate between CPUs)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"
    info = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return f"{info.get('Model name', '?').strip()}; {os.cpu_count()} cores; flags: {info.get('Flags', '').strip()}"


def _roadwork(args: list[str], root: Path, name: str, seed: int) -> dict[str, Any]:
    exe = Path(sys.executable).with_name("roadwork")
    cmd = [str(exe), "run", *args, f"data.source={REAL}", f"root={root}", f"name={name}"]
    cmd += [f"train.seed={seed}", "tracking.enabled=false"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        return {"error": (res.stderr.strip().splitlines() or ["?"])[-1][:160], "wall_s": wall}
    m = json.loads((root / name / "evaluate" / "metrics.json").read_text())
    first = next((ln for ln in res.stderr.splitlines() if ln.startswith("no ")), "")
    return {
        "accuracy": m["test"]["accuracy"],
        "auroc": m["test"]["auroc"],
        "answered": m["selective"]["coverage"],
        "check": m.get("model_check", {}).get("verdict", "?"),
        "train_s": m["timing"]["train"],
        "image_size": json.loads((root / name / "train" / "model.json").read_text())["preprocess"]["size"],
        "wall_s": wall,
        "said": first,
    }


def _yolo(root: Path, name: str, seed: int, budget_s: float, image_size: int) -> dict[str, Any]:
    sys.path.insert(0, str(HERE))
    from _ultralytics_row import ultralytics_row

    r = ultralytics_row(
        root / name / "data" / "dataset.parquet",
        REAL,
        budget_s=budget_s,
        image_size=image_size,
        seed=seed,
        workdir=root / f"yolo-{seed}",
    )
    return {**r, "answered": None, "check": "-"}


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0", help="comma-separated train seeds (each row runs once per seed)")
    ap.add_argument("--out", default="runs/own-photos", help="where the runs are written")
    ap.add_argument("--no-ultralytics", action="store_true", help="skip the Ultralytics row")
    ap.add_argument("--no-finetune-cpu", action="store_true", help="skip the old advice's row (ConvNeXt)")
    args = ap.parse_args()
    if not REAL.is_dir():
        print(f"skipped: {REAL} is absent (see the project's docs on real-roadwork-mini)")
        return 0
    root = Path(args.out).resolve()
    seeds = [int(s) for s in args.seeds.split(",")]
    rows: list[tuple[str, list[str], str]] = [
        (
            "roadwork run data.source=PHOTOS model.pretrained=false (advised offline)",
            ["model.pretrained=false"],
            "advised",
        ),
        ("roadwork run default data.source=PHOTOS", ["default"], "default"),
        ("roadwork run demo data.source=PHOTOS", ["demo"], "demo"),
    ]
    if not args.no_finetune_cpu:
        rows.append(
            (
                "roadwork run finetune-cpu ... model.pretrained=false (the old advice)",
                ["finetune-cpu", "model.pretrained=false"],
                "finetune-cpu",
            )
        )
    results: dict[str, list[dict[str, Any]]] = {}
    for label, cli, name in rows:
        for seed in seeds:
            print(f"running: {label} (seed {seed})", file=sys.stderr, flush=True)
            results.setdefault(label, []).append(_roadwork(cli, root, f"{name}-{seed}", seed))
    if not args.no_ultralytics:
        try:
            import ultralytics  # noqa: F401
        except ImportError:
            print("Ultralytics row skipped: pip install ultralytics (or 'roadwork[yolo]')", file=sys.stderr)
        else:
            label = "Ultralytics YOLO11n-cls from scratch (budget: the advised row's train stage)"
            for seed, adv in zip(seeds, results[rows[0][0]], strict=True):
                print(f"running: {label} (seed {seed})", file=sys.stderr, flush=True)
                budget = adv.get("train_s", 60.0)
                results.setdefault(label, []).append(
                    _yolo(root, f"advised-{seed}", seed, budget, adv.get("image_size", 96))
                )
    print(f"machine: {_cpu()}")
    print(f"Python {platform.python_version()}; data: {REAL} (1,079 photos; splits by content hash)")
    print(f"seeds: {seeds}; HF_HUB_OFFLINE=1 (no pretrained weights)\n")
    print("| command | seed | test accuracy | AUROC | answered | model check | wall s |")
    print("|---|---:|---:|---:|---:|---|---:|")
    for label, runs in results.items():
        for seed, r in zip(seeds, runs, strict=True):
            if "error" in r:
                print(f"| {label} | {seed} | failed: {r['error']} | | | | {r['wall_s']:.0f} |")
                continue
            print(
                f"| {label} | {seed} | {r['accuracy']:.3f} | {r['auroc']:.3f} | {_fmt(r['answered'], '.3f')} "
                f"| {r['check']} | {r['wall_s']:.0f} |"
            )
        ok = [r for r in runs if "error" not in r]
        if len(seeds) > 1 and ok:
            acc = statistics.mean(r["accuracy"] for r in ok)
            auc = statistics.mean(r["auroc"] for r in ok)
            print(f"| {label} | mean | {acc:.3f} | {auc:.3f} | | | |")
    advised = results[rows[0][0]]
    said = next((r.get("said") for r in advised if r.get("said")), "")
    if said:
        print(f"\nthe advised run's first line: {said}")
    yolo = [r for k, v in results.items() if k.startswith("Ultralytics") for r in v]
    if yolo and all("error" not in r for r in advised):
        a = statistics.mean(r["accuracy"] for r in advised)
        y = statistics.mean(r["accuracy"] for r in yolo)
        print(
            f"advised {a:.3f} vs Ultralytics {y:.3f}: target advised ≥ 0.72 and ≥ Ultralytics − 0.02 "
            f"({'met' if a >= 0.72 and a >= y - 0.02 else 'NOT met'})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
