"""The server under hostile input, in process: isolation of a poison request, JSON errors on every path,
admission after the body, the documented schema, Triton's extension endpoints, warm-up kept out of metrics."""

from __future__ import annotations

import base64
import io
import json
import threading

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient

from roadwork.export.bundle import Bundle
from roadwork.serve import ServeSettings, create_app
from tests.serve.conftest import ready_entry


@pytest.fixture(scope="module")
def x(tiny_run, bundle):
    from roadwork.data.preprocess import load_rgb, preprocess

    images = sorted((tiny_run[1].run_dir / "data" / "images").glob("*.jpg"))[:4]
    return preprocess([load_rgb(p) for p in images], bundle.card.preprocess).astype(np.float32)


def _client(bundle, **kw):  # type: ignore[no-untyped-def]
    return TestClient(create_app(bundle, ServeSettings(name="tiny", **kw)), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def client(bundle):
    with _client(bundle, max_queue_delay_ms=1) as c:
        yield c


def _v2(x: np.ndarray, dtype: str = "FP32", **extra) -> dict:  # type: ignore[no-untyped-def]
    return {
        "inputs": [{"name": "input", "shape": list(x.shape), "datatype": dtype, "data": x.ravel().tolist()}],
        **extra,
    }


def test_values_that_overflow_after_the_cast_or_in_the_model_are_400(client, x):
    big = np.full_like(x[:1], 1e300, dtype=np.float64)  # finite in FP64, inf in FP32
    r = client.post("/v2/models/tiny/infer", json=_v2(big, "FP64"))
    assert r.status_code == 400 and "after the cast to FP32" in r.json()["error"]
    huge = np.full_like(
        x[:1], 3e38
    )  # finite in FP32, far outside normalised pixels: refused before the model
    r = client.post("/v2/models/tiny/infer", json=_v2(huge))
    assert r.status_code == 400 and "far outside the model's preprocessed range" in r.json()["error"], r.text
    model = client.app.state.roadwork.model  # type: ignore[attr-defined]
    bound = model.input_bound
    assert 200 < bound < 300  # 100x the reach of ImageNet-normalised pixels, about 2.64
    edge = np.full_like(x[:1], bound * 0.99)
    assert client.post("/v2/models/tiny/infer", json=_v2(edge)).status_code == 200
    try:
        model.input_bound = float("inf")  # without the range check the network itself overflows: still a 400
        r = client.post("/v2/models/tiny/infer", json=_v2(huge))
    finally:
        model.input_bound = bound
    assert r.status_code == 400 and "not finite" in r.json()["error"], r.text
    assert client.post("/v2/models/tiny/infer", json=_v2(x)).status_code == 200


def test_a_poison_request_batched_with_good_ones_fails_alone(bundle, x):
    """Three requests in one batch (a 300 ms window): the good ones get exactly their solo answers."""
    huge = np.full_like(x[:1], 3e38)
    with _client(bundle, max_queue_delay_ms=300, max_batch_size=16) as c:
        c.app.state.roadwork.model.input_bound = float("inf")  # type: ignore[attr-defined]  # reach the model
        solo = c.post("/v2/models/tiny/infer", json=_v2(x[:2])).json()
        bodies = [_v2(x[:2]), _v2(huge), _v2(x[2:])]
        got: dict[int, object] = {}

        def send(i: int) -> None:
            got[i] = c.post("/v2/models/tiny/infer", json=bodies[i])

        threads = [threading.Thread(target=send, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        stats = c.get("/v2/models/tiny/stats").json()["model_stats"][0]
    good, bad, other = (got[i] for i in range(3))
    assert bad.status_code == 400 and "not finite" in bad.json()["error"]  # type: ignore[attr-defined]
    assert good.status_code == 200 and other.status_code == 200  # type: ignore[attr-defined]
    assert good.json()["outputs"] == solo["outputs"]  # type: ignore[attr-defined]
    sizes = {b["batch_size"]: b["compute_infer"]["count"] for b in stats["batch_stats"]}
    assert sizes.get(5) == 1  # all three ran as one batch of 2 + 1 + 2
    assert stats["inference_stats"]["fail"]["count"] == 1
    assert stats["inference_stats"]["success"]["count"] == 3  # the solo one and the two good ones


def _deep(n: int) -> bytes:
    return b'{"inputs": ' + b"[" * n + b"]" * n + b"}"


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (_deep(100_000), "nested too deeply"),
        (
            b'{"inputs": [{"name": "input", "shape": [1, 3, 64, 64], "datatype": "FP32", "data": [1'
            + b"0" * 400
            + b"]}]}",
            "",
        ),
        (b'{"inputs": [{"name": "input", "shape": [1, 3, 2, 2], "datatype": "FP32", "data": [1e999]}]}', ""),
        (b'{"inputs": [], "outputs": 5}', "'inputs'"),
        (
            b'{"inputs": [{"name": "input", "shape": [1,3,2,2], "datatype": ["FP32"], "data": []}]}',
            "datatype",
        ),
        (b'{"inputs": [{"name": {"a": 1}, "shape": [1], "datatype": "FP32"}]}', "unknown input"),
        (b'{"inputs": [{"name": "input", "shape": [1, 3, 2, 2], "datatype": "FP32", "data": 5}]}', "shape"),
        (b"[1, 2, 3]", "'inputs'"),
        (b"null", "'inputs'"),
    ],
)
def test_malformed_v2_bodies_are_400_with_a_json_reason(client, body, needle):
    r = client.post("/v2/models/tiny/infer", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]


def test_overflowing_integers_and_bad_outputs_are_400(client, x, bundle):
    size = bundle.card.preprocess.size
    n = 3 * size * size
    values = ", ".join(["10" + "0" * 400] + ["0"] * (n - 1))  # 10**400: a Python int, no float
    body = (
        f'{{"inputs": [{{"name": "input", "shape": [1, 3, {size}, {size}], "datatype": "FP32", "data": [{values}]}}]}}'
    ).encode()
    r = client.post("/v2/models/tiny/infer", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "too large" in r.json()["error"], r.text
    for outputs in (
        5,
        None,
        [{"name": ["logits"]}],
        ["logits"],
        [{"name": "nope"}],
        [{"name": "label", "parameters": 3}],
    ):
        r = client.post(
            "/v2/models/tiny/infer",
            json=_v2(x[:1], outputs=outputs) | ({} if outputs is not None else {"outputs": None}),
        )
        if outputs is None:  # null means "all outputs", as when it is left out
            assert r.status_code == 200
            continue
        assert r.status_code == 400 and "output" in r.json()["error"], (outputs, r.text)


def test_corrupt_image_errors_leak_no_object_reprs(client):
    r = client.post("/v1/classify", content=b"\x00" * 64, headers={"content-type": "image/png"})
    assert r.status_code == 400
    assert "object at 0x" not in r.json()["error"] and "cannot be decoded" in r.json()["error"]


def test_405_keeps_allow_and_every_error_is_json(client):
    r = client.get("/v2/models/tiny/infer")
    assert r.status_code == 405 and r.headers["allow"] == "POST" and "not allowed" in r.json()["error"]
    r = client.delete("/v2/health/ready")
    assert r.status_code == 405 and "GET" in r.headers["allow"]


def test_a_framework_failure_is_a_json_500_for_that_request_only(bundle, x, monkeypatch):
    app = create_app(bundle, ServeSettings(name="tiny", max_queue_delay_ms=200))
    model = app.state.roadwork.model
    real = model.run_batch

    def flaky(xb, meta):  # type: ignore[no-untyped-def]
        if isinstance(xb, np.ndarray) and (xb == 0.5).any():
            raise RuntimeError("ONNX Runtime: something broke")
        return real(xb, meta)

    monkeypatch.setattr(model, "run_batch", flaky)
    app.state.roadwork.batcher.run_batch = flaky
    with TestClient(app, raise_server_exceptions=False) as c:
        got: dict[int, object] = {}
        bodies = [_v2(x[:1]), _v2(np.full_like(x[:1], 0.5))]

        def send(i: int) -> None:
            got[i] = c.post("/v2/models/tiny/infer", json=bodies[i])

        ts = [threading.Thread(target=send, args=(i,)) for i in range(2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
    assert got[0].status_code == 200  # type: ignore[attr-defined]
    assert got[1].status_code == 500  # type: ignore[attr-defined]
    assert "RuntimeError" in got[1].json()["error"]  # type: ignore[attr-defined]


def test_warm_up_is_not_counted_and_the_latency_budget_is_measured(bundle):
    with _client(bundle) as c:
        text = c.get("/metrics").text
        stats = c.get("/v2/models/tiny/stats").json()["model_stats"][0]
        batcher = c.app.state.roadwork.batcher  # type: ignore[attr-defined]
        a, b = batcher.service.coefficients()
    assert "roadwork_predictions_total{" not in text and "roadwork_abstentions_total 0.0" in text
    assert stats["inference_count"] == 0 and stats["execution_count"] == 0
    assert a >= 0 and b > 0  # four timed warm-up batches (1 and 32 images) fitted t(n) = a + b*n
    assert batcher.budget == pytest.approx(0.5)  # the documented absolute default, max_latency_ms=500
    with _client(bundle, max_latency_ms=0) as c:  # relative: measured from the warm-up batches
        batcher = c.app.state.roadwork.batcher  # type: ignore[attr-defined]
        full = batcher.service.seconds(32)
        assert batcher.budget == pytest.approx(max(3 * full + batcher.delay, 0.05))


def test_pixel_budget_refuses_while_full(bundle):
    buf = io.BytesIO()
    Image.new("RGB", (100, 100)).save(buf, format="PNG")
    png = buf.getvalue()
    with _client(bundle, max_inflight_pixels=15_000) as c:
        model = c.app.state.roadwork.model  # type: ignore[attr-defined]
        held = model.reserve_pixels([png])  # another request is being decoded
        assert held == 10_000
        r = c.post("/v1/classify", content=png, headers={"content-type": "image/png"})
        assert (
            r.status_code == 503
            and r.headers["retry-after"] == "1"
            and "max_inflight_pixels" in r.json()["error"]
        )
        model.release_pixels(held)
        assert c.post("/v1/classify", content=png, headers={"content-type": "image/png"}).status_code == 200
        assert model._pixels == 0


def test_openapi_documents_bodies_and_errors(client):
    spec = client.get("/openapi.json").json()
    infer = spec["paths"]["/v2/models/{name}/infer"]["post"]
    ref = infer["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    name = ref.rsplit("/", 1)[1]
    comps = spec["components"]["schemas"]
    assert name == "InferRequest" and "inputs" in comps[name]["properties"]
    assert {"400", "408", "413", "503"} <= set(infer["responses"])
    assert infer["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorBody")
    classify = spec["paths"]["/v1/classify"]["post"]
    assert {"application/json", "image/jpeg", "multipart/form-data"} <= set(
        classify["requestBody"]["content"]
    )
    for p in ("/v2/models/{name}/config", "/v2/repository/index", "/v2/models/{name}/stats"):
        assert p in spec["paths"]


def test_triton_extension_endpoints(client, bundle):
    cfg = client.get("/v2/models/tiny/config").json()
    size = bundle.card.preprocess.size
    assert cfg["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": [3, size, size]}]
    assert cfg["output"][0]["name"] == "logits" and cfg["output"][0]["dims"] == [len(bundle.classes)]
    assert cfg["max_batch_size"] == 32
    ready = [e for e in client.post("/v2/repository/index", json={}).json() if e["state"] == "READY"]
    assert ready == [ready_entry(bundle)]
    assert client.get("/v2/models/nope/config").status_code == 404


def test_served_name_comes_from_the_bundle(tiny_run):
    from roadwork.serve.app import served_name

    b = Bundle.load(tiny_run[1].bundle)
    assert tiny_run[1].bundle.name == "bundle"
    assert served_name(b) == tiny_run[1].run_dir.name
    b.manifest["name"] = "roadwork-zones"
    assert served_name(b) == "roadwork-zones"


def test_json_images_bad_metadata_and_types(client, tiny_run):
    img = next((tiny_run[1].run_dir / "data" / "images").glob("*.jpg")).read_bytes()
    b64 = base64.b64encode(img).decode()
    for body in (
        {"image": 5},
        {"images": "x"},
        {"image": b64, "metadata": 3},
        {"images": [b64], "metadata": [1]},
    ):
        r = client.post("/v1/classify", json=body)
        assert r.status_code == 400 and "error" in r.json(), body
    r = client.post(
        "/v1/classify",
        content=json.dumps({"image": b64, "metadata": None}),
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 200


def test_after_a_stall_an_idle_server_serves_every_v2_request(bundle, x):
    """A stall (one batch that took 30 s) leaves the batch-time estimate far over any budget; a v2 request on an
    idle server must still be served: it never counts as ahead of itself, and what is ahead is nothing."""
    with _client(bundle, max_queue_delay_ms=1, max_latency_ms=200) as c:
        state = c.app.state.roadwork  # type: ignore[attr-defined]
        for _ in range(20):
            state.batcher.service.observe(1, 30.0)  # as if every recent batch had stalled
        assert state.batcher.expected_seconds(1, ahead=1) > 10  # one image ahead would be refused
        codes = [c.post("/v2/models/tiny/infer", json=_v2(x[:1])).status_code for _ in range(30)]
        assert codes == [200] * 30
        assert state.admission.pending == 0 and state.admission.inside == 0


def test_large_v2_bodies_are_parsed_in_another_process_with_the_same_answers_and_errors(bundle, x):
    """Over OFF_LOOP_BYTES a body is parsed in the parsing process (json.loads holds the GIL: probes must not wait
    behind it): the same answer as parsed here, and a malformed one is the same JSON 400."""
    from roadwork.serve.state import OFF_LOOP_BYTES

    many = np.concatenate([x] * 8)
    small = _v2(many[:1])
    big = _v2(many, id="big")
    assert len(json.dumps(big)) > OFF_LOOP_BYTES > len(json.dumps(small))
    with _client(bundle, max_queue_delay_ms=1) as c:
        state = c.app.state.roadwork  # type: ignore[attr-defined]
        one = c.post("/v2/models/tiny/infer", json=small).json()
        assert state.parse_pool is None  # small bodies: parsed on the loop
        r = c.post("/v2/models/tiny/infer", json=big)
        assert r.status_code == 200 and state.parse_pool is not None and r.json()["id"] == "big"
        logits = next(o for o in r.json()["outputs"] if o["name"] == "logits")
        first = next(o for o in one["outputs"] if o["name"] == "logits")
        assert logits["shape"][0] == len(many) and logits["data"][: len(first["data"])] == first["data"]
        bad = _v2(many)
        bad["inputs"][0]["shape"] = [len(many), 3, 1, 1]
        r = c.post("/v2/models/tiny/infer", json=bad)
        assert r.status_code == 400 and "preprocess to that size" in r.json()["error"]
        bad_id = _v2(many, id=7)
        r = c.post("/v2/models/tiny/infer", json=bad_id)
        assert r.status_code == 400 and "id must be a string" in r.json()["error"]


def test_large_v1_json_bodies_are_parsed_in_another_process_with_the_same_answers_and_errors(bundle):
    """A /v1/classify JSON body over OFF_LOOP_BYTES is parsed and base64-decoded in the parsing process (both hold
    the GIL for a large body): the same predictions as the raw image, and its errors the same JSON 400s."""
    from roadwork.serve.state import OFF_LOOP_BYTES

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (640, 640, 3), dtype=np.uint8)).save(buf, "PNG")
    png = buf.getvalue()
    b64 = base64.b64encode(png).decode()
    assert len(b64) > OFF_LOOP_BYTES
    with _client(bundle, max_queue_delay_ms=1) as c:
        state = c.app.state.roadwork  # type: ignore[attr-defined]
        raw = c.post("/v1/classify", content=png, headers={"content-type": "image/png"}).json()[
            "predictions"
        ][0]
        assert state.parse_pool is None  # not JSON: nothing to parse
        r = c.post("/v1/classify", json={"images": [b64, b64], "metadata": {"camera": "a"}})
        assert r.status_code == 200 and state.parse_pool is not None
        preds = r.json()["predictions"]
        assert len(preds) == 2
        for p in preds:
            assert p["label"] == raw["label"] and p["probability"] == raw["probability"]
        r = c.post("/v1/classify", json={"images": [b64, "!" + b64]})
        assert r.status_code == 400 and "'images[1]' is not valid base64" in r.json()["error"]
        r = c.post(
            "/v1/classify",
            content=b'{"image": "' + b64.encode(),
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]


def test_a_strip_image_and_broken_multipart_bodies_are_json_4xx(client):
    """A 300-byte 1x3000 PNG would be resized to 96x288000 pixels: refused by its shape. Starlette's own
    multipart errors come back as our JSON 400s, not 500s."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 3000)).save(buf, format="PNG")
    r = client.post("/v1/classify", content=buf.getvalue(), headers={"content-type": "image/png"})
    assert r.status_code == 400 and "wider than 32:1" in r.json()["error"]
    r = client.post("/v1/classify", content=b"--x\r\n\r\n", headers={"content-type": "multipart/form-data"})
    assert r.status_code == 400 and "error" in r.json(), r.text
    parts = [("files", (f"{i}.jpg", b"x", "image/jpeg")) for i in range(70)]  # over max_images files
    r = client.post("/v1/classify", files=parts)
    assert 400 <= r.status_code < 500 and "error" in r.json(), r.text
