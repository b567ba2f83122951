"""The HTTP server in process (FastAPI TestClient): every endpoint, every error, parity with the bundle."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient

from roadwork.errors import InputError
from roadwork.export.bundle import Bundle
from roadwork.serve import ServeSettings, create_app


@pytest.fixture(scope="module")
def images(tiny_run):
    _cfg, result = tiny_run
    return sorted((result.run_dir / "data" / "images").glob("*.jpg"))[:6]


def _client(bundle, **kw):  # type: ignore[no-untyped-def]
    return TestClient(create_app(bundle, ServeSettings(name="tiny", max_queue_delay_ms=1, **kw)))


@pytest.fixture(scope="module")
def client(bundle):
    with _client(bundle) as c:
        yield c


_STAMPS = (
    "id",
    "policy_version",
    "audit",
)  # what the server adds to each answer (tests/serve/test_feedback.py)


def _strip(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k not in ("path", "stage", *_STAMPS)}


def _decision(rec: dict) -> dict:
    assert rec["id"] and rec["policy_version"]  # every answer can be referred to
    return {k: v for k, v in rec.items() if k not in _STAMPS}


def test_health_and_metadata(client, bundle):
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    assert client.get("/v2").json()["name"] == "roadwork"
    meta = client.get("/v2/models/tiny").json()
    size = bundle.card.preprocess.size
    assert meta["inputs"][0] == {"name": "input", "datatype": "FP32", "shape": [-1, 3, size, size]}
    assert meta["parameters"]["classes"] == bundle.classes
    assert client.get("/v2/models/tiny/ready").status_code == 200
    r = client.get("/v2/models/nope")
    assert r.status_code == 404 and "serves 'tiny'" in r.json()["error"]
    r = client.get("/nowhere")
    assert r.status_code == 404 and "error" in r.json()


def test_with_the_adaptive_window_a_lone_request_does_not_wait_out_the_window(bundle, images):
    """``adaptive_window=true``: the batcher asks admission what is still on its way, and a lone request runs
    without waiting for the (here 60 s) window; the answer is the same."""
    with _client(bundle) as plain:
        want = [
            _strip(p)
            for p in plain.post("/v1/classify", files={"file": images[0].read_bytes()}).json()["predictions"]
        ]
    settings = {"max_queue_delay_ms": 60_000, "max_latency_ms": 120_000}
    app = create_app(bundle, ServeSettings(name="tiny", adaptive_window=True, **settings))
    with TestClient(app) as c:
        state = app.state.roadwork
        assert state.batcher.incoming is not None and state.batcher.incoming() == state.admission.pending == 0
        r = c.post("/v1/classify", files={"file": images[0].read_bytes()})
        assert r.status_code == 200 and [_strip(p) for p in r.json()["predictions"]] == want
        waited = state.metrics.queue_wait.collect()[0].samples
        total = next(s.value for s in waited if s.name.endswith("_sum"))
        assert total < 30  # far from the 60 s window (a fixed window would have waited all of it)
    assert create_app(bundle, ServeSettings(name="tiny")).state.roadwork.batcher.incoming is None


def test_tiff_and_gif_are_classified_as_roadwork_predict_reads_them(client, bundle, images, tmp_path):
    """The formats predict reads from a folder (data.listing.IMAGE_SUFFIXES) are the ones the server decodes: a
    TIFF (lossless) gets the PNG's answer, a GIF the answer predict gives the same file."""
    from PIL import Image

    with Image.open(images[0]) as im:
        rgb = im.convert("RGB")
    want = {}
    for fmt, ctype in (("PNG", "image/png"), ("TIFF", "image/tiff"), ("GIF", "image/gif")):
        path = tmp_path / f"x.{fmt.lower()}"
        rgb.save(path, format=fmt)
        r = client.post("/v1/classify", content=path.read_bytes(), headers={"content-type": ctype})
        assert r.status_code == 200, r.text
        want[fmt] = [_strip(p) for p in r.json()["predictions"]]
        local = [_strip(p) for p in bundle.predict_paths([path])]
        assert want[fmt] == local
    assert want["TIFF"] == want["PNG"]


def test_every_classify_body_gives_what_roadwork_predict_gives(client, bundle, images):
    expected = [_strip(r) for r in bundle.predict_paths(images)]
    raw = [
        client.post("/v1/classify", content=p.read_bytes(), headers={"content-type": "image/jpeg"}).json()
        for p in images
    ]
    with_stage = [{k: v for k, v in r.items() if k != "path"} for r in bundle.predict_paths(images)]
    assert [_decision(r["predictions"][0]) for r in raw] == with_stage
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in images]
    multi = client.post("/v1/classify", files=files).json()["predictions"]
    b64 = [base64.b64encode(p.read_bytes()).decode() for p in images]
    js = client.post("/v1/classify", json={"images": b64}).json()["predictions"]
    one = client.post("/v1/classify", json={"image": b64[0]}).json()["predictions"]
    for got in (multi, js):
        assert [_strip(r) for r in got] == expected
    assert _strip(one[0]) == expected[0]


def test_cascade_stages_answer_over_http_as_in_the_bundle(tiny_run, images):
    """With the gate loosened by hand (a tiny model certifies none), early stages answer some images; the server
    must give exactly what the bundle gives, and count the answering stage in /metrics."""
    b = Bundle.load(tiny_run[1].bundle)
    assert b.policy.cascade is not None
    from roadwork.data.preprocess import load_rgb

    z = b.stage_runners[0].logits([load_rgb(p) for p in images])  # type: ignore[index]
    conf = b.policy.cascade.stages[0].calibrator.predict_proba(z).max(1)  # type: ignore[union-attr]
    b.policy.cascade.threshold = float(np.median(conf))  # half the images exit at the first stage
    expected = [{k: v for k, v in r.items() if k != "path"} for r in b.predict_paths(images)]
    assert len({r["stage"] for r in expected}) >= 2
    with _client(b) as c:
        got = [
            c.post("/v1/classify", content=p.read_bytes(), headers={"content-type": "image/jpeg"}).json()
            for p in images
        ]
        text = c.get("/metrics").text
    assert [_decision(g["predictions"][0]) for g in got] == expected
    first = b.policy.cascade.names[0]
    n_first = sum(r["stage"] == first for r in expected)
    assert f'roadwork_cascade_stage_total{{stage="{first}"}} {float(n_first)}' in text


def test_stage_inputs_prepared_at_once_give_the_lazy_cascade_s_outputs(tiny_run, images):
    """The server prepares every stage's input in its decode threads (Bundle.stage_inputs), joined across
    requests (StageInputs.concat): the same probabilities, stages and sets as the lazy predict_images, with early
    exits at the first stage."""
    from roadwork.data.preprocess import load_rgb
    from roadwork.export.bundle import StageInputs

    b = Bundle.load(tiny_run[1].bundle)
    assert b.policy.cascade is not None
    ims = [load_rgb(p) for p in images]
    z = b.stage_runners[0].logits(ims)  # type: ignore[index]
    b.policy.cascade.threshold = float(
        np.median(b.policy.cascade.stages[0].calibrator.predict_proba(z).max(1))
    )  # type: ignore[union-attr]
    lazy = b.predict_images(ims)
    eager = b.predict_inputs(StageInputs.concat([b.stage_inputs(ims[:3]), b.stage_inputs(ims[3:])]))
    assert len(set(lazy.stage.tolist())) >= 2
    np.testing.assert_array_equal(eager.probs, lazy.probs)
    np.testing.assert_array_equal(eager.stage, lazy.stage)
    assert eager.records(b.classes) == lazy.records(b.classes)
    with pytest.raises(InputError, match="inputs for 1 stages"):
        b.predict_inputs(StageInputs((b.stage_inputs(ims).arrays[-1],)))


def test_v2_infer_runs_the_model_and_the_policy(client, bundle, images):
    from roadwork.data.preprocess import load_rgb, preprocess

    x = preprocess([load_rgb(p) for p in images], bundle.card.preprocess)
    body = {
        "id": "r1",
        "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}],
    }
    r = client.post("/v2/models/tiny/infer", json=body).json()
    out = {o["name"]: o for o in r["outputs"]}
    assert r["id"] == "r1" and r["model_name"] == "tiny"
    logits = np.array(out["logits"]["data"]).reshape(out["logits"]["shape"])
    assert np.allclose(logits, bundle.logits([load_rgb(p) for p in images]), atol=1e-5)
    assert out["label"]["data"] == [e["label"] for e in bundle.predict_paths(images)]
    only = client.post("/v2/models/tiny/infer", json=body | {"outputs": [{"name": "abstain"}]}).json()
    assert [o["name"] for o in only["outputs"]] == ["abstain"]


def _png(w: int, h: int, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("kwargs", "status", "needle"),
    [
        ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "not accepted"),
        ({"content": b"", "headers": {"content-type": "image/jpeg"}}, 400, "empty"),
        (
            {"content": b"\xff\xd8\xff\xe0garbage", "headers": {"content-type": "image/jpeg"}},
            400,
            "cannot be decoded",
        ),
        ({"content": _png(12000, 12000, "1"), "headers": {"content-type": "image/png"}}, 400, "pixels"),
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
        ({"json": {"picture": "x"}}, 400, '{"image"'),
        ({"json": {"image": "%%%"}}, 400, "'image' is not valid base64"),
        (
            {"json": {"images": [base64.b64encode(b"x").decode(), "%%%"]}},
            400,
            "'images[1]' is not valid base64",
        ),
        ({"json": {"images": []}}, 400, "non-empty list"),
        ({"json": {"image": base64.b64encode(b"GIF89a").decode()}}, 400, "cannot be decoded"),
    ],
)
def test_bad_classify_requests_are_4xx_with_a_json_reason(client, kwargs, status, needle):
    r = client.post("/v1/classify", **kwargs)
    assert r.status_code == status and needle in r.json()["error"]


@pytest.mark.parametrize(
    ("inp", "needle"),
    [
        ({"name": "x", "shape": [1, 3, 4, 4], "datatype": "FP32", "data": [0] * 48}, "unknown input"),
        ({"name": "input", "shape": [1, 3, 4, 4], "datatype": "FP32", "data": [0] * 48}, "is not [N, 3"),
        ({"name": "input", "shape": "big", "datatype": "FP32", "data": []}, "is not [N, 3"),
        ({"name": "input", "shape": [1, 3, 64, 64], "datatype": "INT8", "data": []}, "not supported"),
        ({"name": "input", "shape": [1, 3, 64, 64], "datatype": "FP32", "data": [0.0] * 10}, "needs 12288"),
        (
            {"name": "input", "shape": [1, 3, 64, 64], "datatype": "FP32", "data": ["a"] * 12288},
            "list of numbers",
        ),
    ],
)
def test_bad_v2_requests_are_400(client, inp, needle):
    r = client.post("/v2/models/tiny/infer", json={"inputs": [inp]})
    assert r.status_code == 400 and needle in r.json()["error"]


def test_limits_auth_and_metrics(bundle, images):
    jpg = images[0].read_bytes()
    with _client(bundle, max_body_mb=len(jpg) / 2**20 / 2, api_key="s3cret") as c:
        assert c.get("/v2/health/ready").status_code == 200  # health is open
        r = c.post("/v1/classify", content=jpg, headers={"content-type": "image/jpeg"})
        assert r.status_code == 401 and "Bearer" in r.json()["error"]
        auth = {"authorization": "Bearer s3cret", "content-type": "image/jpeg"}
        r = c.post("/v1/classify", content=jpg, headers=auth)
        assert r.status_code == 413 and "limit" in r.json()["error"]
    with _client(bundle, max_pixels=100) as c:
        r = c.post("/v1/classify", content=jpg, headers={"content-type": "image/jpeg"})
        assert r.status_code == 400 and "pixels" in r.json()["error"]
        c.post("/v1/classify", content=b"x", headers={"content-type": "text/plain"})
        text = c.get("/metrics").text
    assert 'roadwork_http_requests_total{code="415",handler="/v1/classify"} 1.0' in text
    assert "roadwork_batch_size_bucket" in text and "roadwork_confidence_bucket" in text


def test_slice_metadata_reaches_the_policy(bundle, images, monkeypatch):
    seen = []
    real = bundle.policy._decide  # where the model's path and the cascade's meet

    def spy(probs, slices=None):  # type: ignore[no-untyped-def]
        seen.append(slices)
        return real(probs, slices)

    monkeypatch.setattr(bundle.policy, "_decide", spy)
    monkeypatch.setattr(type(bundle.policy), "slice_columns", property(lambda self: ["weather"]))
    with _client(bundle) as c:
        b64 = base64.b64encode(images[0].read_bytes()).decode()
        c.post("/v1/classify", json={"image": b64, "metadata": {"weather": "fog", "other": 1}})
        c.post(
            "/v1/classify?weather=rain",
            content=images[0].read_bytes(),
            headers={"content-type": "image/jpeg"},
        )
    assert {"weather": ["fog"]} in seen and {"weather": ["rain"]} in seen


def test_two_thousand_bad_requests_leave_the_server_healthy(bundle):
    """Only 4xx with JSON bodies, never a 5xx, still ready, and no memory creep (RSS growth < 50 MB)."""
    import resource

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
    good = buf.getvalue()  # noise: the pixel data is most of the file, so any cut lands inside it
    bodies = []
    for i in range(2000):
        kind = i % 8
        if kind == 0:
            bodies.append(("raw", good[: rng.integers(1, int(len(good) * 0.9))]))  # truncated
        elif kind == 1:
            bodies.append(("raw", rng.bytes(int(rng.integers(1, 4000)))))  # noise
        elif kind == 2:
            bodies.append(("json", b'{"image": "' + rng.bytes(20).hex().encode() + b'"}'))
        elif kind == 3:
            bodies.append(("json", rng.bytes(50)))  # not JSON
        elif kind == 4:
            bodies.append(
                (
                    "v2",
                    json.dumps(
                        {"inputs": [{"name": "input", "shape": [1, 3, 2], "datatype": "FP32", "data": [1.0]}]}
                    ).encode(),
                )
            )
        elif kind == 5:
            bodies.append(("v2", json.dumps({"inputs": "nope"}).encode()))
        elif kind == 6:
            bodies.append(("text", b"plain text"))
        else:
            bodies.append(
                ("raw", _png(9000, 9000, "1") if i == 7 else good[:20])
            )  # a bomb once, then headers
    with _client(bundle) as c:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        statuses = []
        for kind, body in bodies:
            if kind == "raw":
                r = c.post("/v1/classify", content=body, headers={"content-type": "image/png"})
            elif kind == "json":
                r = c.post("/v1/classify", content=body, headers={"content-type": "application/json"})
            elif kind == "v2":
                r = c.post(
                    "/v2/models/tiny/infer", content=body, headers={"content-type": "application/json"}
                )
            else:
                r = c.post("/v1/classify", content=body, headers={"content-type": "text/plain"})
            statuses.append(r.status_code)
            assert "error" in r.json()
        grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        assert c.get("/v2/health/ready").status_code == 200
    assert len(statuses) == 2000 and all(400 <= s < 500 for s in statuses)
    assert grown_mb < 50


def test_log_dir_records_every_prediction_with_its_metadata(bundle, images, tmp_path):
    from roadwork.monitor.drift import load_predictions

    with _client(bundle, log_dir=str(tmp_path / "logs"), log_rows_per_file=2) as c:
        for i, p in enumerate(images[:3]):
            b64 = base64.b64encode(p.read_bytes()).decode()
            assert (
                c.post("/v1/classify", json={"image": b64, "metadata": {"weather": f"w{i}"}}).status_code
                == 200
            )
    files = sorted((tmp_path / "logs").glob("*.parquet"))
    assert len(files) == 2  # one full file of 2, the last row flushed at shutdown
    df = load_predictions(tmp_path / "logs")
    assert list(df["weather"]) == ["w0", "w1", "w2"] and {
        "label",
        "probability",
        "set_size",
        "abstain",
        "stage",
    } <= set(df.columns)


def test_v2_binary_tensors_in_and_out_match_the_json_answer(client, bundle, images):
    """Triton's binary-tensor extension: JSON header + raw FP32 input; binary outputs decode to the JSON ones."""
    from roadwork.data.preprocess import load_rgb, preprocess

    x = preprocess([load_rgb(p) for p in images], bundle.card.preprocess).astype("<f4")
    inp = {"name": "input", "shape": list(x.shape), "datatype": "FP32"}
    as_json = client.post(
        "/v2/models/tiny/infer", json={"inputs": [inp | {"data": x.ravel().tolist()}]}
    ).json()
    head = json.dumps(
        {
            "inputs": [inp | {"parameters": {"binary_data_size": x.nbytes}}],
            "outputs": [
                {"name": "logits", "parameters": {"binary_data": True}},
                {"name": "label", "parameters": {"binary_data": True}},
                {"name": "abstain"},
            ],
        }
    ).encode()
    r = client.post(
        "/v2/models/tiny/infer",
        content=head + x.tobytes(),
        headers={
            "Inference-Header-Content-Length": str(len(head)),
            "content-type": "application/octet-stream",
        },
    )
    assert r.status_code == 200
    n = int(r.headers["inference-header-content-length"])
    meta, blob = json.loads(r.content[:n]), r.content[n:]
    out = {o["name"]: o for o in meta["outputs"]}
    expected = {o["name"]: o for o in as_json["outputs"]}
    size = out["logits"]["parameters"]["binary_data_size"]
    logits = np.frombuffer(blob[:size], dtype="<f4").reshape(out["logits"]["shape"])
    assert np.allclose(logits, np.array(expected["logits"]["data"]).reshape(logits.shape), atol=1e-6)
    labels, rest = [], blob[size:]
    while rest:
        k = int.from_bytes(rest[:4], "little")
        labels.append(rest[4 : 4 + k].decode())
        rest = rest[4 + k :]
    assert labels == expected["label"]["data"]
    assert out["abstain"]["data"] == expected["abstain"]["data"]  # not asked as binary: stays JSON
    for headers, content in (
        ({"Inference-Header-Content-Length": "abc"}, head + x.tobytes()),
        ({"Inference-Header-Content-Length": str(len(head))}, head + x.tobytes()[:-4]),  # a short tensor
    ):
        bad = client.post("/v2/models/tiny/infer", content=content, headers=headers)
        assert bad.status_code == 400 and "error" in bad.json()


def test_v2_tensors_get_the_model_alones_certified_policy(client, bundle, images):
    """/v2 infer takes tensors, so it runs the model alone, not the cascade: it applies the policy certified on
    the model alone's outputs (policy-model.json), not the composite's thresholds."""
    from roadwork.data.preprocess import load_rgb, preprocess

    assert bundle.policy.cascade is not None and bundle.model_policy is not None
    assert bundle.model_policy.cascade is None and bundle.tensor_policy is bundle.model_policy
    info = bundle.manifest["export"]["model_policy"]
    assert info["file"] == "policy-model.json" and "/v2" in info["note"]
    x = preprocess([load_rgb(p) for p in images], bundle.card.preprocess)
    body = {
        "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]
    }
    out = {o["name"]: o for o in client.post("/v2/models/tiny/infer", json=body).json()["outputs"]}
    logits = np.array(out["logits"]["data"]).reshape(out["logits"]["shape"])
    expected = bundle.model_policy.apply(logits)
    assert out["abstain"]["data"] == expected.abstain.tolist()
    meta = client.get("/v2/models/tiny").json()["parameters"]
    assert meta["infer_policy"] == "model alone (policy-model.json)"  # fp32: its own file


def test_a_non_string_v2_id_is_a_400_before_the_model_runs_and_the_connection_lives(client, bundle, images):
    from roadwork.data.preprocess import load_rgb, preprocess

    x = preprocess([load_rgb(images[0])], bundle.card.preprocess)
    inp = [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]
    for bad in (5, None, {"a": 1}, ["x"], 1.5, True):
        r = client.post("/v2/models/tiny/infer", json={"id": bad, "inputs": inp})
        assert r.status_code == 400 and "id must be a string" in r.json()["error"]
    assert client.post("/v2/models/tiny/infer", json={"id": "ok", "inputs": inp}).json()["id"] == "ok"


def test_an_empty_api_key_is_refused_not_read_as_no_auth(monkeypatch, capsys):
    from pydantic import ValidationError

    from roadwork.cli import main

    with pytest.raises(ValidationError, match="would switch authentication off"):
        ServeSettings(api_key="  ")
    monkeypatch.setenv("ROADWORK_API_KEY", "")
    assert main(["serve", "some/bundle"]) == 2
    assert "api_key=''" in capsys.readouterr().err
