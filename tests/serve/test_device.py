"""device=cpu|cuda|tensorrt|auto through ONNX Runtime's execution providers; a clear error where absent."""

from __future__ import annotations

import pytest

pytest.importorskip("onnxruntime")

from roadwork.errors import ArtifactError, ConfigError
from roadwork.export.onnx import execution_device, onnx_providers, onnx_session


def test_cpu_and_auto_without_a_gpu_use_the_cpu_provider(tiny_run, monkeypatch):
    import roadwork.export.onnx as onnx_mod

    monkeypatch.setattr(onnx_mod, "_gpu_present", lambda: False)
    assert onnx_providers("cpu") == ["CPUExecutionProvider"]
    assert onnx_providers("auto") == ["CPUExecutionProvider"]
    s = onnx_session(tiny_run[1].bundle / "model.onnx", device="auto")
    assert s.get_providers() == ["CPUExecutionProvider"]


def test_cuda_and_tensorrt_without_their_provider_say_what_to_install(tiny_run, monkeypatch):
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    for device, provider in (("cuda", "CUDAExecutionProvider"), ("tensorrt", "TensorrtExecutionProvider")):
        with pytest.raises(
            ArtifactError, match=f"device={device} needs ONNX Runtime's {provider}.*onnxruntime-gpu"
        ):
            onnx_session(tiny_run[1].bundle / "model.onnx", device=device)
    with pytest.raises(ArtifactError, match="onnxruntime-gpu"), execution_device("cuda"):
        pass
    with pytest.raises(ConfigError, match="device must be one of cpu, cuda, tensorrt, auto. Got 'gpu'"):
        onnx_providers("gpu")


def test_a_provider_without_a_gpu_is_refused_and_tensorrt_options_are_passed(monkeypatch):
    import onnxruntime as ort

    import roadwork.export.onnx as onnx_mod

    monkeypatch.setattr(
        ort,
        "get_available_providers",
        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    monkeypatch.setattr(onnx_mod, "_gpu_present", lambda: False)
    with pytest.raises(ArtifactError, match="no CUDA GPU is visible"):
        onnx_providers("cuda")
    assert onnx_providers("auto") == ["CPUExecutionProvider"]
    monkeypatch.setattr(onnx_mod, "_gpu_present", lambda: True)
    trt = onnx_providers("tensorrt", fp16=True, cache_dir="/tmp/trt")
    assert trt[0] == (
        "TensorrtExecutionProvider",
        {"trt_fp16_enable": True, "trt_engine_cache_enable": True, "trt_engine_cache_path": "/tmp/trt"},
    )
    assert trt[1:] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert onnx_providers("auto")[0][0] == "TensorrtExecutionProvider"


def test_serve_with_device_cuda_fails_before_loading(tiny_run, monkeypatch):
    import onnxruntime as ort

    from roadwork.serve import ServeSettings, create_app

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(ArtifactError, match="device=cuda"):
        create_app(tiny_run[1].bundle, ServeSettings(device="cuda"))
    app = create_app(tiny_run[1].bundle, ServeSettings(device="auto"))
    assert app.state.model.bundle.session.get_providers() == ["CPUExecutionProvider"]
