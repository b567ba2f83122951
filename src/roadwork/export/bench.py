"""``roadwork bench BUNDLE``: every form of the bundle's model, measured side by side in one run.

Columns as Ultralytics' benchmark table: format, status, size MB, accuracy, ECE (test split, from the
manifest, through the bundle's policy), ms/img, img/s and the speed-up over torch eager. Torch eager runs
the same architecture rebuilt from ``model.json`` with random weights (speed does not depend on the values).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from roadwork.export.bundle import Bundle
from roadwork.export.onnx import onnx_session

__all__ = ["bench_bundle", "format_table"]


def _rate(fn: Callable[[], object], n: int, seconds: float) -> float:
    fn()  # warm-up
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or done == 0:
        fn()
        done += n
    return done / (time.perf_counter() - t0)


def bench_bundle(path: str, *, batch: int = 8, seconds: float = 3.0) -> list[dict[str, Any]]:
    bundle = Bundle.load(path)
    s = bundle.card.preprocess.size
    x = np.random.default_rng(0).normal(size=(batch, 3, s, s)).astype(np.float32)
    export = bundle.manifest.get("export", {})
    int8 = bundle.manifest.get("variants", {}).get("int8")
    rows: list[dict[str, Any]] = []
    try:
        import torch

        from roadwork.config import ModelConfig
        from roadwork.models.factory import create_model

        cfg = ModelConfig(
            backbone=bundle.card.backbone, pretrained=False, image_size=s, kwargs=bundle.card.kwargs
        )
        model, _ = create_model(cfg, len(bundle.classes))
        model.eval()
        xt = torch.from_numpy(x)

        def run_torch() -> None:
            with torch.inference_mode():
                model(xt)

        n_params = sum(p.numel() for p in model.parameters())
        rows.append(
            {
                "format": "torch eager",
                "status": "ok",
                "size_mb": n_params * 4 / 2**20,
                "img_s": _rate(run_torch, batch, seconds),
            }
        )
    except ImportError:
        rows.append({"format": "torch eager", "status": "torch not installed (train extra)"})
    files = {"ONNX fp32": ("model.onnx", "fp32"), "ONNX int8": (int8["file"] if int8 else None, "int8")}
    for fmt, (fname, key) in files.items():
        if fname is None:
            rows.append({"format": fmt, "status": "not exported (export.int8=dynamic|static)"})
            continue
        sess = onnx_session(bundle.path / fname)

        def run_onnx(sess: Any = sess) -> None:
            sess.run(None, {"input": x})

        row: dict[str, Any] = {
            "format": fmt,
            "status": "ok",
            "size_mb": (bundle.path / fname).stat().st_size / 2**20,
            "img_s": _rate(run_onnx, batch, seconds),
        }
        if int8 and f"test_accuracy_{key}" in int8:
            row["accuracy"], row["ece"] = int8[f"test_accuracy_{key}"], int8[f"test_ece_{key}"]
        rows.append(row)
    from roadwork.export.variants import tensorrt_available

    rows.append(
        {
            "format": "TensorRT (ORT EP)",
            "status": "available" if tensorrt_available() else "needs an NVIDIA GPU + onnxruntime-gpu",
        }
    )
    base = rows[0].get("img_s")
    for r in rows:
        if "img_s" in r:
            r["ms_img"] = 1000 / r["img_s"]
            r["speedup"] = r["img_s"] / base if base else None
    if export.get("parity_max_abs_diff") is not None:
        rows[1]["parity"] = export["parity_max_abs_diff"]
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    def f(v: Any, spec: str) -> str:
        return "–" if v is None else format(v, spec)

    lines = [
        "| format | status | size MB | accuracy | ECE | ms/img | img/s | vs torch eager |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['format']} | {r['status']} | {f(r.get('size_mb'), '.2f')} | {f(r.get('accuracy'), '.4f')} | "
            f"{f(r.get('ece'), '.4f')} | {f(r.get('ms_img'), '.2f')} | {f(r.get('img_s'), '.1f')} | "
            f"{f(r.get('speedup'), '.2f')}{'x' if r.get('speedup') else ''} |"
        )
    return "\n".join(lines)
