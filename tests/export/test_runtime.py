"""The runtime layer: every runtime × precision opens our model.onnx and agrees with ONNX Runtime fp32."""

from __future__ import annotations

import numpy as np
import pytest

from roadwork.errors import ConfigError
from roadwork.export.runtime import (
    RuntimeSpec,
    RuntimeUnavailable,
    bf16_supported,
    open_session,
    openvino_available,
    runtime_status,
)

needs_openvino = pytest.mark.skipif(
    not openvino_available(), reason="OpenVINO not installed (pip install 'roadwork[openvino]')"
)
# bf16 changes the logits; on a ViT-S at 224 px the max |difference| measured 1.5e-4 (issue 18), a tiny CNN
# with random weights moves more relative to its small logits: this is the recorded bound for this model
BF16_ATOL = 5e-2


@pytest.fixture(scope="module")
def model_onnx(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from roadwork.export.onnx import export_onnx

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, stride=2),
        torch.nn.GELU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(16, 3),
    ).eval()
    path = tmp_path_factory.mktemp("rt") / "model.onnx"
    x = np.random.default_rng(0).normal(size=(4, 3, 32, 32)).astype(np.float32)
    export_onnx(net, x, path)
    return path


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(1).normal(size=(5, 3, 32, 32)).astype(np.float32)


def test_specs_validate_and_name_the_bundle_variants():
    assert RuntimeSpec().name == "fp32" and RuntimeSpec("onnxruntime", "int8").name == "int8"
    assert RuntimeSpec("openvino", "bf16").name == "openvino-bf16"
    assert RuntimeSpec.from_variant("int8") == RuntimeSpec("onnxruntime", "int8")
    assert RuntimeSpec.from_variant("openvino-fp32", threads=2) == RuntimeSpec("openvino", "fp32", threads=2)
    assert RuntimeSpec.from_variant("x", {"runtime": "openvino", "precision": "bf16"}).name == "openvino-bf16"
    with pytest.raises(ConfigError, match="bf16 runs through runtime=openvino"):
        RuntimeSpec("onnxruntime", "bf16")
    with pytest.raises(ConfigError, match="runtime must be one of"):
        RuntimeSpec("tflite", "fp32")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="threads must be >= 0"):
        RuntimeSpec(threads=-1)


def test_onnxruntime_session_records_what_it_runs(model_onnx, x):
    sess = open_session(model_onnx, RuntimeSpec(threads=1))
    z = sess.logits(x)
    assert z.shape == (5, 3) and z.dtype == np.float64
    assert sess.info == {
        "runtime": "onnxruntime",
        "precision": "fp32",
        "threads": 1,
        "intra_op_threads": 1,
        "providers": ["CPUExecutionProvider"],
    }


@needs_openvino
def test_openvino_fp32_matches_onnxruntime_within_1e4(model_onnx, x):
    ref = open_session(model_onnx, RuntimeSpec()).logits(x)
    ov = open_session(model_onnx, RuntimeSpec("openvino", "fp32", threads=1))
    assert np.abs(ov.logits(x) - ref).max() <= 1e-4
    assert ov.logits(x[:1]).shape == (1, 3)  # dynamic batch kept
    assert ov.info["inference_precision"] == "f32" and ov.info["threads"] == 1
    # the ONNX Runtime surface the server and the cascade use
    (inp,), (out,) = ov.session.get_inputs(), ov.session.get_outputs()
    assert (inp.name, inp.shape[1:], out.name) == ("input", [3, 32, 32], "logits")


@needs_openvino
def test_openvino_bf16_runs_bf16_or_refuses(model_onnx, x):
    spec = RuntimeSpec("openvino", "bf16")
    if not bf16_supported():
        # OpenVINO itself would silently compile f32: we refuse, so a "bf16" row never measures f32
        assert "AVX-512 BF16 or AMX" in runtime_status(spec)
        with pytest.raises(RuntimeUnavailable, match="bf16"):
            open_session(model_onnx, spec)
        pytest.skip("this CPU has no AVX-512 BF16 or AMX: bf16 parity cannot run here")
    ref = open_session(model_onnx, RuntimeSpec()).logits(x)
    sess = open_session(model_onnx, spec)
    diff = np.abs(sess.logits(x) - ref).max()
    assert sess.info["inference_precision"] == "bf16"
    assert 0 < diff <= BF16_ATOL  # bf16 really ran (not bit-identical to f32) and stayed within the bound


def test_a_missing_runtime_is_explained(monkeypatch, model_onnx):
    import roadwork.export.runtime as rt

    monkeypatch.setattr(rt, "openvino_available", lambda: False)
    assert "pip install 'roadwork[openvino]'" in runtime_status(RuntimeSpec("openvino", "fp32"))
    with pytest.raises(RuntimeUnavailable, match="OpenVINO not installed"):
        open_session(model_onnx, RuntimeSpec("openvino", "fp32"))


@needs_openvino
def test_fp32_pins_f32_where_openvinos_own_default_is_bf16(model_onnx, x):
    import openvino as ov

    default = str(ov.Core().compile_model(str(model_onnx), "CPU").get_property("INFERENCE_PRECISION_HINT"))
    if not bf16_supported():
        pytest.skip(f"OpenVINO's default here is {default}: no AVX-512 BF16 or AMX to pin against")
    assert "bfloat16" in default  # left alone, OpenVINO would run bf16 on this CPU
    sess = open_session(model_onnx, RuntimeSpec("openvino", "fp32"))
    assert sess.info["inference_precision"] == "f32"
    ref = open_session(model_onnx, RuntimeSpec()).logits(x)
    assert np.abs(sess.logits(x) - ref).max() <= 1e-4


# NNCF int8 of the tiny random CNN: max |logit difference| vs ONNX Runtime fp32 measured 6e-4; the bound
OV_INT8_ATOL = 5e-2


@needs_openvino
def test_openvino_int8_through_nncf_stays_within_the_recorded_bound(model_onnx, x, tmp_path):
    pytest.importorskip("nncf", reason="NNCF not installed (pip install 'roadwork[openvino]')")
    from roadwork.export.variants import quantize_openvino_int8

    calib = np.random.default_rng(2).normal(size=(32, 3, 32, 32)).astype(np.float32)
    info = quantize_openvino_int8(model_onnx, tmp_path / "q.xml", calibration=calib)
    assert (tmp_path / "q.bin").is_file() and info["calibration_images"] == 32
    assert info["model_type"] == "default"  # no attention in this graph
    sess = open_session(tmp_path / "q.xml", RuntimeSpec("openvino", "int8", threads=1))
    assert sess.info["inference_precision"] == "f32"  # the ops NNCF left in float: f32 whatever the CPU
    ref = open_session(model_onnx, RuntimeSpec()).logits(x)
    diff = np.abs(sess.logits(x) - ref).max()
    assert 0 < diff <= OV_INT8_ATOL  # quantised (not bit-identical) and within the bound
    runtime_ops = sess.session.compiled.get_runtime_model().get_ops()
    kinds = {
        (op.get_rt_info()["layerType"].astype(str), op.get_rt_info()["runtimePrecision"].astype(str))
        for op in runtime_ops
    }
    # OpenVINO runs the convolutions in 8-bit integers; the signedness is the CPU's int8 kernel: i8 with AMX (the
    # Intel Xeons this project runs on), u8 activations (u8 x s8 VNNI) without it (the AMD EPYCs)
    from roadwork.export.runtime import cpu_flags

    expected = "i8" if "amx_int8" in cpu_flags() else "u8"
    conv_precisions = {precision for layer, precision in kinds if layer == "Convolution"}
    assert expected in conv_precisions, f"no {expected} convolution on this CPU at run time: {sorted(kinds)}"


def test_onnxruntime_threads_are_recorded(model_onnx):
    from roadwork.export.runtime import physical_cores

    assert open_session(model_onnx, RuntimeSpec()).info["intra_op_threads"] == physical_cores() >= 1
    assert open_session(model_onnx, RuntimeSpec(threads=1)).info["intra_op_threads"] == 1


def _variant_models(model_onnx, tmp_path):  # type: ignore[no-untyped-def]
    """Every variant the project exports, as (name, model file, spec): fp32 and static int8 on ONNX Runtime,
    OpenVINO fp32 / bf16 / NNCF int8 where installed and supported by this CPU."""
    from roadwork.export.variants import quantize_int8

    calib = np.random.default_rng(2).normal(size=(32, 3, 32, 32)).astype(np.float32)
    q = tmp_path / "model-int8.onnx"
    quantize_int8(model_onnx, q, mode="static", calibration=calib)
    out = [("fp32", model_onnx, RuntimeSpec()), ("int8", q, RuntimeSpec("onnxruntime", "int8"))]
    if openvino_available():
        out.append(("openvino-fp32", model_onnx, RuntimeSpec("openvino", "fp32")))
        if bf16_supported():
            out.append(("openvino-bf16", model_onnx, RuntimeSpec("openvino", "bf16")))
        try:
            from roadwork.export.variants import quantize_openvino_int8

            quantize_openvino_int8(model_onnx, tmp_path / "ov.xml", calibration=calib)
            out.append(("openvino-int8", tmp_path / "ov.xml", RuntimeSpec("openvino", "int8")))
        except ImportError:  # NNCF absent
            pass
    return out


def test_every_variant_answers_an_image_the_same_alone_and_inside_a_batch(model_onnx, tmp_path):
    """A served variant's answer must not depend on its batch-mates (the server batches 1 to max_batch_size,
    the policy is certified at another batch size): one image alone vs at position 17 of 64 others."""
    rng = np.random.default_rng(5)
    batch = rng.normal(size=(64, 3, 32, 32)).astype(np.float32) * rng.uniform(0.2, 5, (64, 1, 1, 1))
    batch = batch.astype(np.float32)
    for name, path, spec in _variant_models(model_onnx, tmp_path):
        sess = open_session(path, spec)
        alone = sess.logits(batch[17:18], batch_size=1)
        inside = sess.logits(batch, batch_size=64)[17:18]
        diff = float(np.abs(alone - inside).max())
        print(f"{name}: max |Δlogit| alone vs in a batch of 64 = {diff:.2e}")
        assert diff <= 1e-5, f"{name} depends on its batch-mates: {diff:.2e}"
        if name == "int8":  # the policy certified on its outputs at export's batch size is the one served
            _same_policy_at_any_batch(sess, batch)


def _same_policy_at_any_batch(sess, batch) -> None:  # type: ignore[no-untyped-def]
    import warnings

    from roadwork.config import load_config
    from roadwork.errors import RoadworkWarning
    from roadwork.pipeline.certify import certify_served
    from roadwork.trust import Predictions

    y = np.arange(64) % 3
    ids = np.array([f"i{i}" for i in range(64)])
    cfg = load_config("default", ["selective.target_risk=0.5"])
    policies = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RoadworkWarning)
        for bs in (64, 8, 1):
            z = sess.logits(batch, batch_size=bs)
            policies.append(certify_served(cfg, Predictions(ids, y, z, ["a", "b", "c"]))[0].to_dict())
    assert policies[0] == policies[1] == policies[2]


def test_dynamic_int8_is_refused_where_it_would_be_served(model_onnx, tmp_path):
    """Its scales are computed over the whole batch: measured here, refused by the config, a bundle and bench."""
    from roadwork.config import load_config
    from roadwork.export.bundle import BATCH_DEPENDENT, batch_dependent
    from roadwork.export.variants import quantize_int8

    q = tmp_path / "dyn.onnx"
    quantize_int8(model_onnx, q, mode="dynamic")
    rng = np.random.default_rng(5)
    batch = (rng.normal(size=(64, 3, 32, 32)) * rng.uniform(0.2, 5, (64, 1, 1, 1))).astype(np.float32)
    sess = open_session(q, RuntimeSpec("onnxruntime", "int8"))
    diff = float(
        np.abs(sess.logits(batch[17:18], batch_size=1) - sess.logits(batch, batch_size=64)[17:18]).max()
    )
    assert diff > 1e-5  # why it is refused
    with pytest.raises(ConfigError, match="export.int8=dynamic is refused"):
        load_config("demo", ["export.int8=dynamic"])
    assert batch_dependent({"mode": "dynamic"}) and not batch_dependent({"mode": "static"})
    assert "export.int8=static" in BATCH_DEPENDENT


def test_a_full_disk_is_not_a_reason_to_switch_exporters(tmp_path, monkeypatch):
    """The dynamo exporter falls back to the legacy one for graphs it rejects, never for a disk error: that is
    raised as it is (and nothing half-written is left)."""
    import errno

    torch = pytest.importorskip("torch")
    import roadwork.export.onnx as onnx_mod

    class _Program:
        def save(self, path: str, **_: object) -> None:
            with open(path, "wb") as f:
                f.write(b"half")
            raise RuntimeError("could not save the program") from OSError(
                errno.ENOSPC, "No space left on device"
            )

    monkeypatch.setattr(
        torch.onnx, "export", lambda *a, **k: _Program() if k.get("dynamo") else pytest.fail()
    )
    path = tmp_path / "model.onnx"
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2)).eval()
    with pytest.raises(OSError) as err:
        onnx_mod.export_onnx(net, np.zeros((2, 3, 2, 2), np.float32), path)
    assert err.value.errno == errno.ENOSPC and not path.exists()
