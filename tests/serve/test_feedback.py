"""POST /v1/feedback and the ids on every answer: the field loop as a client sees it."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient

from roadwork.export.bundle import Bundle
from roadwork.serve import ServeSettings, create_app


@pytest.fixture(scope="module")
def images(tiny_run):
    return [p.read_bytes() for p in sorted((tiny_run[1].run_dir / "data" / "images").glob("*.jpg"))[:6]]


def _classify(c: TestClient, images: list[bytes]) -> list[dict]:  # type: ignore[type-arg]
    files = [("files", (f"{i}.jpg", b, "image/jpeg")) for i, b in enumerate(images)]
    r = c.post("/v1/classify", files=files)
    assert r.status_code == 200, r.text
    return r.json()["predictions"]  # type: ignore[no-any-return]


def test_every_answer_has_an_id_and_its_policy_version_even_without_a_store(bundle, images):
    with TestClient(create_app(bundle, ServeSettings(name="tiny"))) as c:
        preds = _classify(c, images[:3])
        assert len({p["id"] for p in preds}) == 3 and "audit" not in preds[0]
        assert {p["policy_version"] for p in preds} == {bundle.manifest["files"]["policy.json"][:12]}
        r = c.post("/v1/feedback", json={"labels": [{"id": preds[0]["id"], "label": 0}]})
        assert r.status_code == 404 and "feedback_db" in r.json()["error"]


def test_feedback_is_stored_idempotent_validated_and_survives_a_restart(bundle, images, tmp_path):
    db = str(tmp_path / "field.db")
    settings = ServeSettings(name="tiny", feedback_db=db, audit_rate=1.0)
    with TestClient(create_app(bundle, settings)) as c:
        preds = _classify(c, images)
        assert all(p["audit"] is True for p in preds)
        ids = [p["id"] for p in preds]
        classes = bundle.classes
        r = c.post(
            "/v1/feedback",
            json={
                "labels": [
                    {"id": ids[0], "label": classes[1]},
                    {"id": ids[1], "label": 0},
                    {"id": "nope", "label": 1},
                ]
            },
        )
        assert r.status_code == 200 and r.json() == {"accepted": 2, "unknown": ["nope"], "duplicates": []}
        r = c.post("/v1/feedback", json={"labels": [{"id": ids[0], "label": 0}]})
        assert r.json() == {"accepted": 0, "unknown": [], "duplicates": [ids[0]]}
        bad = c.post("/v1/feedback", json={"labels": [{"id": ids[2], "label": "cats"}]})
        assert bad.status_code == 400 and "not a class of this model" in bad.json()["error"]
        assert c.post("/v1/feedback", json={"labels": [{"id": ids[2], "label": 7}]}).status_code == 400
        for odd in (True, 1.0, None, [1]):  # JSON true is not class 1, nor 1.0 an index
            r = c.post("/v1/feedback", json={"labels": [{"id": ids[2], "label": odd}]})
            assert r.status_code == 400 and "integer index" in r.json()["error"], (odd, r.text)
        many = {"labels": [{"id": f"x{i}", "label": 0} for i in range(1001)]}
        assert c.post("/v1/feedback", json=many).status_code == 422
        assert c.post("/v1/feedback", json={"labels": []}).status_code == 422
        assert c.post(
            "/v1/feedback", content=b"{not json", headers={"content-type": "application/json"}
        ).status_code in (400, 422)
        metrics = c.get("/metrics").text
        assert 'roadwork_field_rows{kind="labels"} 2.0' in metrics
        assert 'roadwork_field_rate{bound="point",rate="accuracy",slice="all"}' in metrics
    with TestClient(create_app(bundle, settings)) as c:  # a restart: every answered id is still there
        # the field gauges are there at start-up, before any new label
        assert 'roadwork_field_rows{kind="labels"} 2.0' in c.get("/metrics").text
        r = c.post("/v1/feedback", json={"labels": [{"id": i, "label": 1} for i in ids[2:]]})
        assert r.json() == {"accepted": len(ids) - 2, "unknown": [], "duplicates": []}


def test_feedback_needs_the_api_key_like_every_route(bundle, images, tmp_path):
    settings = ServeSettings(name="tiny", feedback_db=str(tmp_path / "f.db"), api_key="k")
    with TestClient(create_app(bundle, settings)) as c:
        r = c.post("/v1/feedback", json={"labels": [{"id": "a", "label": 0}]})
        assert r.status_code == 401
        r = c.post(
            "/v1/feedback", json={"labels": [{"id": "a", "label": 0}]}, headers={"Authorization": "Bearer k"}
        )
        assert r.status_code == 200 and r.json()["unknown"] == ["a"]


def test_online_conformal_moves_the_served_threshold_and_replicas_share_it(tiny_run, images, tmp_path):
    import asyncio

    path = tiny_run[1].bundle
    db = str(tmp_path / "field.db")
    settings = ServeSettings(
        name="tiny", feedback_db=db, audit_rate=1.0, conformal_online="aci", online_eta=0.1
    )
    a, b = Bundle.load(path), Bundle.load(path)
    certified = a.policy.conformal.threshold_
    with TestClient(create_app(a, settings)) as c, TestClient(create_app(b, settings)) as replica:
        preds = _classify(c, images)
        classes = a.classes
        # every label outside its served set: each is a miscoverage, so the threshold must rise by η(1 - α)
        wrong = [
            {"id": p["id"], "label": next((k for k in classes if k not in p["prediction_set"]), classes[0])}
            for p in preds
        ]
        misses = sum(w["label"] not in p["prediction_set"] for w, p in zip(wrong, preds, strict=True))
        # each id also sent a second time in the same request: stored once, learned from once
        twice = wrong + [{"id": w["id"], "label": classes[0]} for w in wrong]
        r = c.post("/v1/feedback", json={"labels": twice}).json()
        assert r["accepted"] == len(preds) and len(r["duplicates"]) == len(preds)
        state = c.app.state.roadwork  # type: ignore[attr-defined]
        alpha = a.policy.conformal.alpha
        want = 0.1 * (misses - alpha * len(preds))
        assert state.field.online.offsets["sets"]["all"] == pytest.approx(want)
        assert state.field.online.updates["sets"]["all"] == len(preds)
        if certified != float("inf"):
            assert a.policy.conformal.threshold_ == pytest.approx(certified + want)
        t0, target = state.certified.abstention.threshold, state.certified.abstention.target_risk
        if t0 != float("inf"):  # the abstention's threshold moves by its step on the answered ones
            answered = [(w, p) for w, p in zip(wrong, preds, strict=True) if not p["abstain"]]
            moved = 0.1 * (1 - t0) * sum((w["label"] != p["label"]) - target for w, p in answered)
            assert a.policy.abstention.threshold == pytest.approx(t0 + moved)
        other = replica.app.state.roadwork  # type: ignore[attr-defined]
        asyncio.run(other.refresh_online())  # what the replica's refresher does every 2 s
        assert other.field.online.offsets == state.field.online.offsets
    with pytest.raises(ValueError, match="feedback_db"):
        ServeSettings(conformal_online="aci")


def test_v2_answers_carry_ids_their_policy_version_and_take_feedback(tiny_run, bundle, tmp_path):
    """Triton clients get ids too (response parameters, comma-separated in image order), stored like /v1's, with
    the version of the policy /v2 tensors are decided under (the model alone's for a cascade bundle)."""
    import numpy as np

    from roadwork.data.preprocess import load_rgb, preprocess

    paths = sorted((tiny_run[1].run_dir / "data" / "images").glob("*.jpg"))[:3]
    x = preprocess([load_rgb(p) for p in paths], bundle.card.preprocess).astype(np.float32)
    body = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]
    }
    settings = ServeSettings(name="tiny", feedback_db=str(tmp_path / "field.db"), audit_rate=1.0)
    with TestClient(create_app(bundle, settings)) as c:
        r = c.post("/v2/models/tiny/infer", json=body)
        assert r.status_code == 200, r.text
        params = r.json()["parameters"]
        ids = params["ids"].split(",")
        assert len(set(ids)) == 3 and params["audit"] == "true,true,true"
        assert params["policy_version"] == bundle.tensor_policy_version
        fb = c.post("/v1/feedback", json={"labels": [{"id": i, "label": 0} for i in ids]})
        assert fb.json() == {"accepted": 3, "unknown": [], "duplicates": []}
