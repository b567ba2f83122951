"""Other forms of an exported model: int8 ONNX (dynamic or static QDQ), OpenVINO int8 (NNCF post-training
quantisation), a Triton model repository, TensorRT.

ONNX Runtime int8 goes *into* the bundle as ``model-int8.onnx``, OpenVINO int8 as ``model-openvino-int8.xml`` +
``.bin`` (an OpenVINO IR; both hash-checked like the rest, chosen with ``Bundle.load(..., variant=...)``,
``roadwork serve BUNDLE variant=...`` or ``variant=auto`` after ``roadwork bench BUNDLE select=true``). Each has
its own policy, certified on its own outputs by the export stage, and its accuracy/ECE change in the manifest.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np

from roadwork._deps import require
from roadwork.errors import ConfigError
from roadwork.export.onnx import INPUT_NAME, OUTPUT_NAME

__all__ = ["quantize_int8", "quantize_openvino_int8", "tensorrt_available", "write_triton_repository"]


def quantize_int8(
    src: Path, dst: Path, *, mode: Literal["dynamic", "static"], calibration: np.ndarray | None = None
) -> dict[str, Any]:
    """Write an int8 copy of ``src``: dynamic (weights int8, activations quantised at run time) or static QDQ
    (activation ranges calibrated on ``calibration``, training images preprocessed like the model's input)."""
    require("onnxruntime")
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = dst.with_suffix(".pre.onnx")
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    try:
        if mode == "dynamic":
            quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QInt8)
            return {"mode": "dynamic", "weights": "int8"}
        if calibration is None or len(calibration) == 0:
            raise ConfigError("static int8 needs calibration images (the training split is empty).")

        class _Reader(CalibrationDataReader):
            def __init__(self, x: np.ndarray) -> None:
                self.it: Iterator[np.ndarray] = iter(np.array_split(x, max(1, len(x) // 16)))

            def get_next(self) -> dict[str, np.ndarray] | None:
                batch = next(self.it, None)
                return None if batch is None else {INPUT_NAME: np.ascontiguousarray(batch, np.float32)}

        quantize_static(
            str(pre),
            str(dst),
            _Reader(calibration),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
        )
        return {"mode": "static", "format": "QDQ", "calibration_images": len(calibration)}
    finally:
        pre.unlink(missing_ok=True)


def quantize_openvino_int8(src: Path, dst: Path, *, calibration: np.ndarray) -> dict[str, Any]:
    """Write an OpenVINO int8 IR of ``src`` (``dst``: ``*.xml``, its weights beside it as ``*.bin``) by NNCF
    post-training quantisation: activation ranges from ``calibration`` (training images preprocessed like the
    model's input), weights int8 per channel; a graph with attention (``Softmax``) is quantised as
    ``ModelType.TRANSFORMER`` (NNCF keeps the accuracy-critical ops in float). The ops left in float run in f32
    (see :func:`roadwork.export.runtime.open_session`), so the outputs do not depend on the CPU's bf16 support."""
    require("openvino")
    nncf = require("nncf")
    import openvino as ov

    if dst.suffix != ".xml":
        raise ConfigError(f"An OpenVINO IR is written as NAME.xml + NAME.bin; got dst={str(dst)!r}.")
    if calibration is None or len(calibration) == 0:
        raise ConfigError("OpenVINO int8 needs calibration images (the training split is empty).")
    model = ov.Core().read_model(str(src))
    transformer = any(op.get_type_name() == "Softmax" for op in model.get_ops())
    batches = [
        np.ascontiguousarray(b, np.float32)
        for b in np.array_split(calibration, max(1, len(calibration) // 16))
    ]
    quantized = nncf.quantize(
        model,
        nncf.Dataset(batches, lambda b: {INPUT_NAME: b}),
        preset=nncf.QuantizationPreset.MIXED if transformer else nncf.QuantizationPreset.PERFORMANCE,
        model_type=nncf.ModelType.TRANSFORMER if transformer else None,
        subset_size=len(batches),  # NNCF counts dataset items: batches here
    )
    ov.save_model(quantized, str(dst), compress_to_fp16=False)
    return {
        "mode": "static",
        "format": "OpenVINO IR (NNCF post-training quantisation)",
        "calibration_images": len(calibration),
        "model_type": "transformer" if transformer else "default",
        "nncf": nncf.__version__,
    }


def tensorrt_available() -> bool:
    """Whether ONNX Runtime here has the TensorRT execution provider (onnxruntime-gpu with TensorRT)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "TensorrtExecutionProvider" in ort.get_available_providers()


def write_triton_repository(onnx_path: Path, out: Path, *, name: str, max_batch_size: int = 32) -> Path:
    """A Triton model repository: ``out/name/config.pbtxt`` and ``out/name/1/model.onnx``, with dynamic batching
    and the input/output names, types and shapes read from the ONNX graph."""
    onnx = require("onnx")
    import shutil

    model = onnx.load(str(onnx_path), load_external_data=False)
    types = {1: "TYPE_FP32", 10: "TYPE_FP16", 11: "TYPE_FP64", 7: "TYPE_INT64"}

    def tensor(v: Any, kind: str) -> str:
        dims = [d.dim_value for d in v.type.tensor_type.shape.dim][1:]  # without the batch dimension
        dtype = types.get(v.type.tensor_type.elem_type, "TYPE_FP32")
        return f'  {{\n    name: "{v.name}"\n    data_type: {dtype}\n    dims: [ {", ".join(map(str, dims))} ]\n  }}'

    inputs = [tensor(v, "input") for v in model.graph.input if v.name == INPUT_NAME]
    outputs = [tensor(v, "output") for v in model.graph.output if v.name == OUTPUT_NAME]
    if not inputs or not outputs:
        raise ConfigError(f"{onnx_path} has no {INPUT_NAME!r} input or {OUTPUT_NAME!r} output to serve.")
    config = (
        f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: {max_batch_size}\n'
        f"input [\n{','.join(inputs)}\n]\noutput [\n{','.join(outputs)}\n]\n"
        f"dynamic_batching {{\n  preferred_batch_size: [ {max(1, max_batch_size // 2)}, {max_batch_size} ]\n"
        "  max_queue_delay_microseconds: 5000\n}\n"
        "instance_group [\n  { kind: KIND_CPU, count: 1 }\n]\n"
    )
    (out / name / "1").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(onnx_path, out / name / "1" / "model.onnx")
    (out / name / "config.pbtxt").write_text(config)
    return out / name
