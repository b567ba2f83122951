"""Triton's own client (``tritonclient.http``) against the real server on 127.0.0.1: metadata, model config,
repository index, statistics, and inference with JSON and with binary tensors, both matching the bundle."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest

from roadwork.export.bundle import Bundle
from roadwork.serve import ServeSettings, create_app
from tests.serve.conftest import ready_entry

httpclient = pytest.importorskip("tritonclient.http")
uvicorn = pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def served(tiny_run):
    bundle = Bundle.load(tiny_run[1].bundle)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(bundle, ServeSettings(name="tiny", max_queue_delay_ms=1))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)  # not the main thread: no signal handlers
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    yield bundle, f"127.0.0.1:{port}"
    server.should_exit = True
    thread.join(30)


@pytest.fixture(scope="module")
def x(tiny_run, served):
    from roadwork.data.preprocess import load_rgb, preprocess

    images = sorted((tiny_run[1].run_dir / "data" / "images").glob("*.jpg"))[:3]
    return preprocess([load_rgb(p) for p in images], served[0].card.preprocess).astype(np.float32)


def test_tritonclient_metadata_config_index_and_stats(served, x):
    bundle, url = served
    c = httpclient.InferenceServerClient(url)
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("tiny")
    assert c.get_server_metadata()["name"] == "roadwork"
    meta = c.get_model_metadata("tiny")
    assert meta["inputs"][0]["shape"] == [-1, 3, x.shape[2], x.shape[3]]
    cfg = c.get_model_config("tiny")
    assert cfg["input"][0] == {"name": "input", "data_type": "TYPE_FP32", "dims": [3, x.shape[2], x.shape[3]]}
    assert cfg["output"][0]["dims"] == [len(bundle.classes)]
    ready = [e for e in c.get_model_repository_index() if e["state"] == "READY"]
    assert ready == [ready_entry(bundle)]
    before = c.get_inference_statistics("tiny")["model_stats"][0]
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    c.infer("tiny", [inp])
    after = c.get_inference_statistics("tiny")["model_stats"][0]
    assert after["inference_count"] - before["inference_count"] == len(x)
    assert after["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"] == 1
    assert after["inference_stats"]["success"]["ns"] > before["inference_stats"]["success"]["ns"]
    assert c.get_inference_statistics()["model_stats"][0]["name"] == "tiny"
    with pytest.raises(Exception, match="unknown model"):
        c.get_model_config("nope")
    c.close()


@pytest.mark.parametrize("binary", [False, True])
def test_tritonclient_infer_json_and_binary_match_the_bundle(served, x, binary):
    bundle, url = served
    c = httpclient.InferenceServerClient(url)
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("logits", "label", "abstain")]
    res = c.infer("tiny", [inp], outputs=outputs, request_id="r7")
    c.close()
    logits = res.as_numpy("logits")
    expected = bundle.policy.apply(bundle.session.run(["logits"], {"input": x})[0].astype(np.float64))
    assert logits.shape == (len(x), len(bundle.classes))
    assert np.allclose(logits, bundle.session.run(["logits"], {"input": x})[0], atol=1e-5)
    labels = [v.decode() if isinstance(v, bytes) else v for v in res.as_numpy("label").tolist()]
    assert labels == [bundle.classes[i] for i in expected.probs.argmax(1)]
    assert res.as_numpy("abstain").dtype == np.bool_ and res.get_response()["id"] == "r7"
