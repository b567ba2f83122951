"""ONNX export with a dynamic batch dimension and a parity check against torch on real inputs."""

from __future__ import annotations

import contextlib
import errno
import logging
import warnings
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import numpy as np

from roadwork._deps import require
from roadwork.errors import ArtifactError

__all__ = [
    "DEVICES",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "execution_device",
    "export_onnx",
    "onnx_logits",
    "onnx_providers",
    "onnx_session",
]

DEVICES = ("cpu", "cuda", "tensorrt", "auto")
"""Execution devices a session can be opened on (ONNX Runtime providers; ``auto``: the best installed)."""
# the device of sessions opened without one (Bundle.load opens several): set with ``execution_device``
_DEVICE: ContextVar[tuple[str, bool, str | None]] = ContextVar(
    "roadwork_onnx_device", default=("cpu", False, None)
)
_PROVIDER = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}

INPUT_NAME, OUTPUT_NAME = "input", "logits"
"""The exported graph's input and output names."""
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
        disk = _os_error(e)
        if disk is not None:  # a full or failing disk is not a graph the exporter rejects: no silent switch
            path.unlink(missing_ok=True)
            raise disk from e
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        log.warning("dynamo ONNX export failed (%s); falling back to the legacy exporter", reason)
        _legacy(torch, model, x, path, opset)
        return f"legacy: {reason}"


_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}


def _os_error(e: BaseException) -> OSError | None:
    """The disk error behind ``e`` (itself, or one it was raised from), if any: exporters wrap what they hit."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, OSError) and cur.errno in _DISK_ERRNOS:
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


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


@contextlib.contextmanager
def execution_device(
    device: str, *, fp16: bool = False, cache_dir: str | Path | None = None
) -> Iterator[None]:
    """Sessions opened inside (``Bundle.load`` opens one per model) run on ``device`` unless given another;
    ``fp16`` and ``cache_dir`` are TensorRT's (see :func:`onnx_providers`)."""
    onnx_providers(device)  # fail here, before anything is loaded, when the device is not available
    token = _DEVICE.set((device, fp16, None if cache_dir is None else str(cache_dir)))
    try:
        yield
    finally:
        _DEVICE.reset(token)


def onnx_providers(
    device: str, *, fp16: bool = False, cache_dir: str | Path | None = None
) -> list[str | tuple[str, dict[str, Any]]]:
    """ONNX Runtime execution providers for ``device`` (``cpu``, ``cuda``, ``tensorrt``, ``auto``), best first,
    CPU last as ONNX Runtime's fallback for operators the others lack. ``tensorrt`` caches built engines in
    ``cache_dir`` and builds fp16 engines with ``fp16``. Raises :class:`ArtifactError` naming what to install
    when the device's provider is not in this ONNX Runtime build."""
    from roadwork.errors import ConfigError

    if device not in DEVICES:
        raise ConfigError(f"device must be one of {', '.join(DEVICES)}. Got {device!r} instead.")
    ort = require("onnxruntime")
    available = set(ort.get_available_providers())
    if device == "auto":
        device = next(
            (d for d in ("tensorrt", "cuda") if _PROVIDER[d] in available and _gpu_present()), "cpu"
        )
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if _PROVIDER[device] not in available:
        raise ArtifactError(
            f"device={device} needs ONNX Runtime's {_PROVIDER[device]}, which this installation lacks (it has "
            f"{', '.join(sorted(available))}). Install the GPU build (pip uninstall onnxruntime && pip install "
            "onnxruntime-gpu) with a matching CUDA/cuDNN"
            + (" and TensorRT" if device == "tensorrt" else "")
            + ", or pass device=cpu."
        )
    if not _gpu_present():
        raise ArtifactError(
            f"device={device}: ONNX Runtime has {_PROVIDER[device]} but no CUDA GPU is visible (no "
            "/dev/nvidia0 and CUDA_VISIBLE_DEVICES does not name one); pass device=cpu."
        )
    providers: list[str | tuple[str, dict[str, Any]]] = []
    if device == "tensorrt":
        trt: dict[str, Any] = {"trt_fp16_enable": fp16, "trt_engine_cache_enable": cache_dir is not None}
        if cache_dir is not None:
            trt["trt_engine_cache_path"] = str(cache_dir)
        providers.append(("TensorrtExecutionProvider", trt))
    providers += ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return providers


def _gpu_present() -> bool:
    import os

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    return Path("/dev/nvidia0").exists() or Path("/dev/dxg").exists()


def onnx_session(
    path: Path,
    *,
    threads: int = 0,
    spin: bool = True,
    device: str | None = None,
    fp16: bool = False,
    cache_dir: str | Path | None = None,
) -> Any:
    """``spin=False`` when several sessions share the cores (a cascade): ONNX Runtime's worker threads otherwise
    busy-wait after each run and slow the next session down. ``device``: see :func:`onnx_providers`; by
    default the one :func:`execution_device` set (``cpu`` outside it). A GPU session that ONNX Runtime opened on
    the CPU after all (it falls back silently when CUDA fails to initialise) is an error, not a slow surprise."""
    ort = require("onnxruntime")
    if device is None:
        device, fp16, cache_dir = _DEVICE.get()
    providers = onnx_providers(device, fp16=fp16, cache_dir=cache_dir)
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), sess_options=so, providers=providers)
    except Exception as e:
        raise ArtifactError(f"ONNX Runtime cannot load {str(path)!r}: {e}") from None
    wanted = providers[0] if isinstance(providers[0], str) else providers[0][0]
    if wanted not in session.get_providers():
        raise ArtifactError(
            f"ONNX Runtime opened {str(path)!r} with {session.get_providers()} instead of {wanted} "
            f"(device={device}): the GPU runtime failed to initialise (CUDA/cuDNN versions?); see ONNX "
            "Runtime's log with ORT_LOG_LEVEL=0, or pass device=cpu."
        )
    return session


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
