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
    assert app.state.roadwork.model.bundle.session.get_providers() == ["CPUExecutionProvider"]


def test_tensorrt_fp16_and_engine_cache_reach_the_session(tiny_run, monkeypatch, tmp_path):
    import onnxruntime as ort

    import roadwork.export.onnx as onnx_mod
    from roadwork.serve import ServeSettings, create_app

    seen: list[list] = []

    class FakeSession:
        def __init__(self, path, sess_options=None, providers=None):  # type: ignore[no-untyped-def]
            seen.append(list(providers))
            self.real = ort_session(path)

        def get_providers(self):  # type: ignore[no-untyped-def]
            return [p if isinstance(p, str) else p[0] for p in seen[-1]]

        def __getattr__(self, name):  # type: ignore[no-untyped-def]
            return getattr(self.real, name)

    real_cls = ort.InferenceSession

    def ort_session(path):  # type: ignore[no-untyped-def]
        return real_cls(path, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(
        ort,
        "get_available_providers",
        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    monkeypatch.setattr(onnx_mod, "_gpu_present", lambda: True)
    monkeypatch.setattr(ort, "InferenceSession", FakeSession)
    settings = ServeSettings(device="tensorrt", trt_fp16=True, trt_cache_dir=str(tmp_path / "engines"))
    app = create_app(tiny_run[1].bundle, settings)
    assert seen and all(p[0][0] == "TensorrtExecutionProvider" for p in seen)  # every model of the bundle
    assert seen[-1][0][1] == {
        "trt_fp16_enable": True,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(tmp_path / "engines"),
    }
    assert app.state.roadwork.model.bundle.session.get_providers()[0] == "TensorrtExecutionProvider"
    assert onnx_mod._DEVICE.get() == ("cpu", False, None)  # the context is restored after loading
