"""Runtimes: the layer under the bundle that runs a model file — ``runtime × precision × device``.

    RuntimeSpec("onnxruntime", "fp32")   model.onnx through ONNX Runtime (CPU, CUDA or TensorRT)
    RuntimeSpec("onnxruntime", "int8")   model-int8.onnx (static QDQ or dynamic) through ONNX Runtime
    RuntimeSpec("openvino", "fp32")      model.onnx compiled by OpenVINO for the CPU, f32 inference precision
    RuntimeSpec("openvino", "bf16")      the same with INFERENCE_PRECISION_HINT=bf16 (AVX-512 BF16 or AMX only)
    RuntimeSpec("openvino", "int8")      model-openvino-int8.xml (NNCF post-training int8), float ops pinned to f32

OpenVINO's own default on a CPU with AVX-512 BF16 or AMX is bf16: ``precision=fp32`` therefore always sets
``INFERENCE_PRECISION_HINT=f32`` (checked on the compiled model), and ``bf16`` sets ``bf16``. ONNX Runtime has
no bf16 CPU kernels on x86 (its only bf16 CPU path is an arm64 fast-math GEMM), so ``onnxruntime`` × ``bf16``
is refused at construction.

:func:`open_session` returns an object with ONNX Runtime's ``run`` / ``get_inputs`` / ``get_outputs`` surface
whatever the runtime, so the bundle, the server, batch prediction and the cascade's stages run any of them
unchanged; its ``info`` records what was asked and what the runtime actually runs (threads, precision).

Precision changes the outputs: a bundle serves a runtime × precision only with a policy certified on that
variant's own outputs (see :mod:`roadwork.export.bundle`). OpenVINO falls back to f32 *silently* when the CPU
cannot run bf16; here that is an error, so a "bf16" row never measures f32.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from roadwork.errors import ArtifactError, ConfigError
from roadwork.export.onnx import INPUT_NAME, OUTPUT_NAME, onnx_logits, onnx_session

__all__ = [
    "PRECISIONS",
    "RUNTIMES",
    "RuntimeSpec",
    "RuntimeUnavailable",
    "Session",
    "bf16_supported",
    "cpu_flags",
    "cpu_summary",
    "open_session",
    "openvino_available",
    "physical_cores",
    "runtime_status",
]

RUNTIMES = ("onnxruntime", "openvino")
"""The runtimes a bundle variant can run on."""
PRECISIONS = ("fp32", "bf16", "int8")
"""The precisions a variant can run at (bf16 only where the CPU has it)."""
Runtime = Literal["onnxruntime", "openvino"]
Precision = Literal["fp32", "bf16", "int8"]
_OV_PRECISION = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}  # int8: the ops NNCF left in float


class RuntimeUnavailable(ArtifactError):
    """This runtime × precision cannot run here (not installed, or the CPU lacks the instructions)."""


@dataclass(frozen=True)
class RuntimeSpec:
    """What runs a model file. ``threads=0``: the runtime's default (one per physical core). ``device``: ONNX
    Runtime's (``None``: the one :func:`roadwork.export.onnx.execution_device` set); OpenVINO runs on the CPU."""

    runtime: Runtime = "onnxruntime"
    precision: Precision = "fp32"
    device: Literal["cpu", "cuda"] | None = None  # None: the device execution_device() set (cpu outside it)
    threads: int = 0

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise ConfigError(f"runtime must be one of {', '.join(RUNTIMES)}. Got {self.runtime!r} instead.")
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"precision must be one of {', '.join(PRECISIONS)}. Got {self.precision!r} instead."
            )
        if self.device not in (None, "cpu", "cuda"):
            raise ConfigError(f"device must be cpu or cuda. Got {self.device!r} instead.")
        if self.runtime == "onnxruntime" and self.precision == "bf16":
            raise ConfigError(
                "precision=bf16 runs through runtime=openvino; ONNX Runtime's CPU kernels have no bf16."
            )
        if self.runtime == "openvino" and self.device == "cuda":
            raise ConfigError("runtime=openvino runs on device=cpu here; use runtime=onnxruntime for cuda.")
        if self.threads < 0:
            raise ConfigError(f"threads must be >= 0 (0: the runtime's default). Got {self.threads} instead.")

    @property
    def name(self) -> str:
        """The bundle's variant name: ``fp32`` and ``int8`` for ONNX Runtime (the names bundles always had),
        ``openvino-fp32`` / ``openvino-bf16`` / ``openvino-int8`` otherwise."""
        return self.precision if self.runtime == "onnxruntime" else f"{self.runtime}-{self.precision}"

    @classmethod
    def from_variant(cls, name: str, info: dict[str, Any] | None = None, *, threads: int = 0) -> RuntimeSpec:
        """The spec of a bundle variant: its manifest entry's ``runtime``/``precision`` (entries written before
        runtimes existed have neither: ``fp32`` and ``int8`` are ONNX Runtime's)."""
        info = info or {}
        if "runtime" in info:
            return cls(info["runtime"], info["precision"], threads=threads)
        runtime, _, precision = name.rpartition("-")
        return cls(runtime or "onnxruntime", precision, threads=threads)  # type: ignore[arg-type]


def cpu_flags() -> set[str]:
    """The CPU's feature flags as ``lscpu`` shows them (``/proc/cpuinfo``); empty where it cannot be read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


_SPEED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_summary() -> dict[str, Any]:
    """The CPU a measurement or certification was made on: model name, cores and the flags that change which
    runtime × precision is fastest (recorded in the bundle next to the choice)."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = cpu_flags()
    return {"model": model, "cores": os.cpu_count(), "flags": [f for f in _SPEED_FLAGS if f in flags]}


def physical_cores() -> int:
    """Physical cores (ONNX Runtime's and OpenVINO's default thread count): distinct (package, core) pairs in
    ``/proc/cpuinfo``, else ``os.cpu_count()``."""
    cores: set[tuple[str, str]] = set()
    package = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            if key.strip() == "physical id":
                package = val.strip()
            elif key.strip() == "core id":
                cores.add((package, val.strip()))
    except OSError:
        pass
    return len(cores) or os.cpu_count() or 1


def openvino_available() -> bool:
    """Whether OpenVINO's Python runtime is installed (the ``openvino`` extra)."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def bf16_supported() -> bool:
    """Whether OpenVINO runs bf16 on this CPU (AVX-512 BF16 or AMX): its own capability list, else lscpu's."""
    if openvino_available():
        import openvino as ov

        return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def runtime_status(spec: RuntimeSpec) -> str:
    """``ok``, or why ``spec`` cannot run on this machine (what to install, what the CPU lacks)."""
    if spec.runtime == "openvino":
        if not openvino_available():
            return "OpenVINO not installed (pip install 'roadwork[openvino]')"
        if spec.precision == "bf16" and not bf16_supported():
            return "this CPU has no AVX-512 BF16 or AMX (lscpu: avx512_bf16 / amx_bf16)"
        return "ok"
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "ONNX Runtime not installed (pip install 'roadwork[serve]')"
    return "ok"


class _Port:
    """An OpenVINO port with ONNX Runtime's ``NodeArg`` surface (name, shape, type)."""

    def __init__(self, port: Any) -> None:
        self.name = port.get_any_name()
        shape = port.get_partial_shape()
        self.shape = [d.get_length() if d.is_static else "batch" for d in shape]
        self.type = "tensor(float)"


class _OpenVINOSession:
    """An OpenVINO compiled model behind ONNX Runtime's ``InferenceSession.run`` surface."""

    def __init__(self, compiled: Any) -> None:
        self.compiled = compiled
        self.request = compiled.create_infer_request()

    def run(self, names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        out = self.request.infer(feeds)
        ports = self.compiled.outputs if names is None else [self.compiled.output(n) for n in names]
        return [np.asarray(out[p]) for p in ports]

    def get_inputs(self) -> list[_Port]:
        return [_Port(p) for p in self.compiled.inputs]

    def get_outputs(self) -> list[_Port]:
        return [_Port(p) for p in self.compiled.outputs]

    def get_providers(self) -> list[str]:
        return ["OpenVINO:CPU"]


@dataclass
class Session:
    """A model file opened by one runtime. ``session`` has ONNX Runtime's ``run`` surface; ``info`` records
    the spec, the threads and the precision the runtime actually computes in."""

    spec: RuntimeSpec
    path: Path
    session: Any
    info: dict[str, Any]

    def logits(self, x: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
        """float64 logits (N, K) of ``x`` (N, 3, H, W) float32."""
        return onnx_logits(self.session, x, batch_size=batch_size)


def open_session(path: str | Path, spec: RuntimeSpec, *, spin: bool = True) -> Session:
    """Open ``path`` with ``spec``. Raises :class:`RuntimeUnavailable` when the spec cannot run here and
    :class:`ArtifactError` when the runtime rejects the file. ``spin=False``: see :func:`onnx_session`."""
    path = Path(path)
    status = runtime_status(spec)
    if status != "ok":
        raise RuntimeUnavailable(f"runtime={spec.runtime} precision={spec.precision}: {status}.")
    if spec.runtime == "onnxruntime":
        sess = onnx_session(path, threads=spec.threads, spin=spin, device=spec.device)
        return Session(
            spec,
            path,
            sess,
            {
                "runtime": "onnxruntime",
                "precision": spec.precision,
                "threads": spec.threads,  # 0: ONNX Runtime's default, one per physical core
                "intra_op_threads": spec.threads or physical_cores(),
                "providers": sess.get_providers(),
            },
        )
    import openvino as ov  # runtime_status checked it is installed

    config: dict[str, Any] = {
        "INFERENCE_PRECISION_HINT": _OV_PRECISION.get(spec.precision, "f32"),
        "PERFORMANCE_HINT": "LATENCY",  # one stream: a served batch uses every thread
    }
    if spec.threads:
        config["INFERENCE_NUM_THREADS"] = spec.threads
    try:
        compiled = ov.Core().compile_model(str(path), "CPU", config)
    except Exception as e:
        raise ArtifactError(f"OpenVINO cannot compile {str(path)!r}: {e}") from None
    effective = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
    effective = {"<Type: 'float32'>": "f32", "<Type: 'bfloat16'>": "bf16"}.get(effective, effective)
    if effective != _OV_PRECISION[spec.precision] and spec.precision != "bf16":
        raise ArtifactError(
            f"runtime=openvino precision={spec.precision}: OpenVINO compiled {path.name} in {effective}, not f32."
        )
    if spec.precision == "bf16" and effective != "bf16":  # OpenVINO fell back to f32 without a word
        raise RuntimeUnavailable(
            f"runtime=openvino precision=bf16: OpenVINO compiled {path.name} in {effective} on this CPU "
            "(no AVX-512 BF16 or AMX); use precision=fp32."
        )
    names = {p.get_any_name() for p in compiled.inputs} | {p.get_any_name() for p in compiled.outputs}
    if not {INPUT_NAME, OUTPUT_NAME} <= names:
        raise ArtifactError(f"{str(path)!r} has no {INPUT_NAME!r} input or {OUTPUT_NAME!r} output.")
    return Session(
        spec,
        path,
        _OpenVINOSession(compiled),
        {
            "runtime": "openvino",
            "precision": spec.precision,
            "inference_precision": effective,
            "threads": int(compiled.get_property("INFERENCE_NUM_THREADS")),
            "streams": int(compiled.get_property("NUM_STREAMS")),
            "version": ov.__version__,
        },
    )
