"""A bundle says what it will do: the share of images its policy answers, or that it abstains on every image and
what to change — in roadwork predict, the server's start-up line, /v2/models/{name} and the model card."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from roadwork.export.bundle import Bundle


@pytest.fixture(scope="module")
def bundle(tiny_run):
    return Bundle.load(tiny_run[1].bundle)


def _with_threshold(bundle: Bundle, threshold: float) -> Bundle:
    a = dataclasses.replace(bundle.policy.abstention, threshold=threshold, groups={})
    return dataclasses.replace(bundle, policy=dataclasses.replace(bundle.policy, abstention=a))


def test_the_recorded_test_share_is_the_bundles_own(tiny_run, bundle):
    """Recorded at export from the stored test outputs through the served path; the evaluate stage runs the
    exported bundle on the test images: the same share (logit parity 1e-4 can move a row at the threshold)."""
    _, result = tiny_run
    rec = bundle.manifest["export"]["answers"]
    n = rec["test_n"]
    assert n == result.metrics["test"]["n"]
    assert abs(rec["test"] - result.metrics["selective"]["coverage"]) <= 1 / n + 1e-12
    assert rec["calib"] == bundle.policy.abstention.coverage
    assert 0 < rec["smallest_certifiable_risk"] <= 1


def test_a_bundle_that_answers_nothing_warns_with_the_target_that_would(bundle):
    statement, warn = _with_threshold(bundle, math.inf).answers_statement()
    assert warn and "abstains on every image" in statement
    lowest = bundle.manifest["export"]["answers"]["smallest_certifiable_risk"]
    if lowest < 1:
        assert f"selective.target_risk={lowest:g}" in statement
    statement, warn = _with_threshold(bundle, 0.5).answers_statement()
    assert not warn and "this bundle answers about" in statement and "abstain=true" in statement


def test_predict_and_v2_metadata_say_it(tiny_run, bundle, capsys):
    from roadwork.cli import main

    _, result = tiny_run
    image = next((result.run_dir / "data" / "images").glob("*.jpg"))
    assert main(["predict", str(result.bundle), str(image)]) == 0
    statement, warn = bundle.answers_statement()
    assert statement in capsys.readouterr().err
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from roadwork.serve import ServeSettings, create_app

    with TestClient(create_app(bundle, ServeSettings(name="tiny"))) as client:
        answers = client.get("/v2/models/tiny").json()["parameters"]["answers"]
    assert answers["statement"] == statement and answers["abstains_on_every_image"] == warn
    assert answers["test_share"] == bundle.manifest["export"]["answers"]["test"]
    card = (result.run_dir / "evaluate" / "MODEL_CARD.md").read_text()
    assert "- **Answers:** " in card
    share = json.loads((result.run_dir / "evaluate" / "metrics.json").read_text())["selective"]["coverage"]
    assert ("**none**" in card) == (share == 0)
