"""Triton's repository API: a recertified version loaded into a running server without a restart, every answer
carrying the version it was decided under, a tampered version refused with require_signature, unload/load."""

from __future__ import annotations

import shutil
import threading

import pandas as pd
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient

from roadwork.export.signing import generate_keypair, sign_bundle
from roadwork.serve import ServeSettings, create_app
from tests.serve.conftest import replace_file, rewrite_json

pytestmark = pytest.mark.filterwarnings(
    "ignore::roadwork.errors.RoadworkWarning"
)  # tiny models certify little
KEY = {"Authorization": "Bearer k"}


@pytest.fixture(scope="module")
def repo(tiny_run, tmp_path_factory):
    """A repository folder: the run's bundle (signed) as ``v1`` and its recertified version ``v2`` (signed)."""
    from roadwork.field.recertify import recertify

    _, result = tiny_run
    root = tmp_path_factory.mktemp("repo")
    pub = generate_keypair(root / "key")
    v1 = root / "models" / "v1"
    shutil.copytree(result.bundle, v1)
    sign_bundle(v1, root / "key")
    data = pd.read_parquet(result.run_dir / "data" / "dataset.parquet")
    paths = [str(result.run_dir / "data" / p) for p in data["path"]]
    report = recertify(v1, paths, list(data["label"]), out=root / "models" / "v2", key=root / "key")
    return root, pub, report["old"]["policy_version"], report["new"]["policy_version"]


@pytest.fixture(scope="module")
def image(tiny_run):
    return sorted((tiny_run[1].run_dir / "data" / "images").glob("*.jpg"))[0].read_bytes()


def _versions(c: TestClient) -> dict[str, dict]:  # type: ignore[type-arg]
    r = c.post("/v2/repository/index", headers=KEY)
    assert r.status_code == 200, r.text
    return {e["version"]: e for e in r.json()}


def _classify(c: TestClient, image: bytes) -> tuple[int, dict]:  # type: ignore[type-arg]
    r = c.post("/v1/classify", content=image, headers=KEY | {"Content-Type": "image/jpeg"})
    return r.status_code, r.json()


def test_a_recertified_version_is_loaded_without_a_restart_and_a_tampered_one_is_refused(
    repo, image, tmp_path
):
    root, pub, old, new = repo
    models = root / "models"
    settings = ServeSettings(name="tiny", api_key="k", require_signature=str(pub))
    bad = models / "v3-tampered"  # v2 with its policy changed after signing (hash and manifest redone)
    try:
        with TestClient(create_app(models / "v1", settings)) as c:
            index = _versions(c)
            assert index["v1"]["state"] == "READY" and index["v1"]["policy_version"] == old
            assert index["v2"]["state"] == "UNAVAILABLE" and index["v2"]["policy_version"] == new
            assert _classify(c, image)[1]["predictions"][0]["policy_version"] == old
            # guarded by the API key
            assert (
                c.post("/v2/repository/models/tiny/load", json={"parameters": {"version": "v2"}}).status_code
                == 401
            )
            # clients keep being answered while the load runs
            answers: list[int] = []
            stop = threading.Event()

            def client() -> None:
                while not stop.is_set():
                    answers.append(_classify(c, image)[0])

            threads = [threading.Thread(target=client) for _ in range(4)]
            for t in threads:
                t.start()
            # what tritonclient's load_model sends: {} and no content type; the newest version, v2
            r = c.post("/v2/repository/models/tiny/load", content=b"{}", headers=KEY)
            stop.set()
            for t in threads:
                t.join()
            assert r.status_code == 200, r.text
            assert r.json()["state"] == "READY" and r.json()["policy_version"] == new
            assert answers and set(answers) <= {200, 503}
            assert {_classify(c, image)[1]["predictions"][0]["policy_version"] for _ in range(3)} == {new}
            # a tampered version: refused, and the served one keeps serving
            shutil.copytree(models / "v2", bad)
            rewrite_json(bad, "policy.json", lambda p: p["conformal"].update(alpha=0.5))
            r = c.post(
                "/v2/repository/models/tiny/load", json={"parameters": {"version": bad.name}}, headers=KEY
            )
            assert r.status_code == 400 and "signed" in r.json()["error"]
            assert _classify(c, image)[1]["predictions"][0]["policy_version"] == new
            # a version folder that is a link (here to a signed copy outside the repository): refused, and the
            # repository stays where it was
            outside = tmp_path / "outside"
            shutil.copytree(models / "v2", outside)
            (models / "link").symlink_to(outside)
            try:
                r = c.post(
                    "/v2/repository/models/tiny/load", json={"parameters": {"version": "link"}}, headers=KEY
                )
                assert r.status_code == 400 and "link" in r.json()["error"], r.text
                assert {"v1", "v2"} <= set(_versions(c)) and "link" not in _versions(c)
            finally:
                (models / "link").unlink()
            # names outside the repository, unknown versions, a missing version, another model
            for version, status in (("../v1", 400), ("/etc", 400), ("nope", 404), (7, 400)):
                r = c.post(
                    "/v2/repository/models/tiny/load", json={"parameters": {"version": version}}, headers=KEY
                )
                assert r.status_code == status, (version, r.text)
            assert c.post("/v2/repository/models/tiny/load", json={"x": 1}, headers=KEY).status_code == 400
            assert c.post("/v2/repository/models/tiny/load", content=b"{nope", headers=KEY).status_code == 400
            assert c.post("/v2/repository/models/other/load", json={}, headers=KEY).status_code == 404
            # unload: not ready, inference 503; load again: back
            assert c.post("/v2/repository/models/tiny/unload", headers=KEY).status_code == 200
            assert c.get("/v2/health/ready").status_code == 503
            assert _classify(c, image)[0] == 503
            r = c.post("/v2/repository/models/tiny/load", json={"parameters": {"version": "v1"}}, headers=KEY)
            assert r.status_code == 200 and c.get("/v2/health/ready").status_code == 200
            assert _classify(c, image)[1]["predictions"][0]["policy_version"] == old
    finally:
        shutil.rmtree(bad, ignore_errors=True)


def test_a_version_with_other_classes_is_refused(repo, image, tmp_path):
    root, _, _, _ = repo
    models = tmp_path / "models"
    shutil.copytree(root / "models" / "v1", models / "v1")
    other = models / "other"
    shutil.copytree(root / "models" / "v1", other)
    for name in ("model.json", "policy.json"):
        rewrite_json(other, name, lambda d: d.update(classes=["a", "b"]))
    (other / "manifest.sig").unlink(missing_ok=True)
    with TestClient(create_app(models / "v1", ServeSettings(name="tiny"))) as c:
        r = c.post("/v2/repository/models/tiny/load", json={"parameters": {"version": "other"}})
        assert r.status_code == 400 and "classes" in r.json()["error"], r.text
        assert c.get("/v2/health/ready").status_code == 200


def test_a_version_whose_cascade_stages_take_other_inputs_is_refused(repo, tmp_path):
    """Requests prepare every stage's input when they arrive (Bundle.stage_inputs): a version whose stages
    preprocess differently would get inputs prepared for the other one."""
    root, _, _, _ = repo
    models = tmp_path / "models"
    shutil.copytree(root / "models" / "v1", models / "v1")
    other = models / "other"
    shutil.copytree(root / "models" / "v1", other)
    cards = sorted(p.name for p in other.glob("stage*-model.json"))  # a network stage (not the trees)
    assert cards, "the tiny bundle is a cascade with a network stage"
    rewrite_json(other, cards[0], lambda d: d["preprocess"].update(interpolation="bicubic"))
    (other / "manifest.sig").unlink(missing_ok=True)
    with TestClient(create_app(models / "v1", ServeSettings(name="tiny"))) as c:
        r = c.post("/v2/repository/models/tiny/load", json={"parameters": {"version": "other"}})
        assert r.status_code == 400 and "cascade stages" in r.json()["error"], r.text
        assert c.get("/v2/health/ready").status_code == 200


@pytest.mark.parametrize("tamper", ["deep policy", "sparse model"])
def test_a_signed_version_with_a_malformed_or_oversized_file_is_a_json_400_naming_it(repo, tmp_path, tamper):
    """A deeply nested policy.json, validly signed (a 500 RecursionError traceback before); a model.onnx swapped
    for a sparse file after signing (copied whole into TMPDIR before: 8 GB filled it and the load was a 500)."""
    root, pub, _, _ = repo
    models = tmp_path / "models"
    shutil.copytree(root / "models" / "v1", models / "v1")
    bad = models / "bad"
    shutil.copytree(root / "models" / "v1", bad)
    if tamper == "deep policy":
        replace_file(bad, "policy.json", b"[" * 1200 + b"]" * 1200)
        sign_bundle(bad, root / "key")
        name, why = "policy.json", "nested too deeply"
    else:
        size = (bad / "model.onnx").stat().st_size
        (bad / "model.onnx").unlink()
        with open(bad / "model.onnx", "wb") as f:
            f.truncate(size + (64 << 20))
        name, why = "model.onnx", "refused unread"
    settings = ServeSettings(name="tiny", require_signature=str(pub))
    with TestClient(create_app(models / "v1", settings)) as c:
        r = c.post("/v2/repository/models/tiny/load", json={"parameters": {"version": "bad"}})
        assert r.status_code == 400, r.text
        assert why in r.json()["error"] and str(bad / name) in r.json()["error"], r.text
        assert c.get("/v2/health/ready").status_code == 200


@pytest.mark.parametrize(
    "edit",
    [
        lambda p: p["cascade"]["stages"][0].update(file=None),  # a 500 from the load before
        lambda p: p.update(positive_class=[]),  # READY before, then every /v1/classify a 500
        lambda p: p["conformal"].update(thresholds=[]),  # READY before, then every /v1/classify a 500
    ],
    ids=["stage file null", "positive class list", "thresholds empty"],
)
def test_a_signed_version_whose_served_path_would_fail_is_a_json_400_and_never_swapped_in(
    repo, image, tmp_path, edit
):
    root, pub, _, _ = repo
    models = tmp_path / "models"
    shutil.copytree(root / "models" / "v1", models / "v1")
    bad = models / "bad"
    shutil.copytree(root / "models" / "v1", bad)
    rewrite_json(bad, "policy.json", edit)
    sign_bundle(bad, root / "key")
    settings = ServeSettings(name="tiny", require_signature=str(pub))
    with TestClient(create_app(models / "v1", settings)) as c:
        r = c.post("/v2/repository/models/tiny/load", json={"parameters": {"version": "bad"}})
        assert r.status_code == 400 and str(bad) in r.json()["error"], r.text
        assert _versions(c)["v1"]["state"] == "READY" and _classify(c, image)[0] == 200
