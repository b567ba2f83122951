"""ONNX export with a dynamic batch dimension and a parity check against torch on real inputs."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from roadwork._deps import require
from roadwork.errors import ArtifactError

__all__ = ["INPUT_NAME", "OUTPUT_NAME", "export_onnx", "onnx_logits", "onnx_session"]

INPUT_NAME, OUTPUT_NAME = "input", "logits"
log = logging.getLogger(__name__)


def export_onnx(
    model: Any, sample: np.ndarray, path: Path, *, opset: int = 18, exporter: str = "dynamo"
) -> str:
    """Write ``model`` to ``path``; returns which exporter was used ("dynamo", "legacy" when asked for, or
    "legacy: <reason>" when the dynamo exporter failed)."""
    torch = require("torch")
    require("onnx")
    model = model.eval()
    x = torch.from_numpy(np.ascontiguousarray(sample[:2], dtype=np.float32))
    if exporter == "legacy":
        _legacy(torch, model, x, path, opset)
        return "legacy"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            batch = torch.export.Dim("batch", min=1, max=4096)
            prog = torch.onnx.export(
                model,
                (x,),
                dynamo=True,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: batch},),
                external_data=False,
                verbose=False,
            )
            prog.save(str(path), external_data=False)
        return "dynamo"
    except Exception as e:  # the dynamo exporter still rejects some graphs; the legacy one is a fine fallback
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        log.warning("dynamo ONNX export failed (%s); falling back to the legacy exporter", reason)
        _legacy(torch, model, x, path, opset)
        return f"legacy: {reason}"


def _legacy(torch: Any, model: Any, x: Any, path: Path, opset: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (x,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )


def onnx_session(path: Path, *, threads: int = 0, spin: bool = True) -> Any:
    """``spin=False`` when several sessions share the cores (a cascade): ONNX Runtime's worker threads otherwise
    busy-wait after each run and slow the next session down."""
    ort = require("onnxruntime")
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ArtifactError(f"ONNX Runtime cannot load {str(path)!r}: {e}") from None


def onnx_logits(session: Any, x: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
    """Run the session over ``x`` (N, 3, H, W) float32 in batches; float64 logits of shape (N, K)."""
    outs = [
        session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(x[i : i + batch_size], np.float32)})[0]
        for i in range(0, len(x), batch_size)
    ]
    if not outs:
        k = session.get_outputs()[0].shape[1]
        return np.zeros((0, int(k) if isinstance(k, int) else 0))
    return np.concatenate(outs).astype(np.float64)
