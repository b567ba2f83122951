"""Recertify: the refitted policy holds its targets over many re-splits, and `roadwork recertify` writes a new,
verifiable (signed) bundle version beside the untouched old one."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from roadwork.export.bundle import Bundle
from roadwork.field.recertify import check_figures, refit


def _pool(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Served binary probabilities of a shifted domain: the model is right ~85 % of the time."""
    y = rng.integers(0, 2, n)
    p_true = 1 / (1 + np.exp(-rng.normal(1.3, 1.2, n)))
    return np.where(y[:, None] == np.arange(2), p_true[:, None], 1 - p_true[:, None]), y


def test_the_refitted_policy_holds_its_targets_over_300_resplits(tiny_run):
    policy = Bundle.load(tiny_run[1].bundle).policy
    rng = np.random.default_rng(0)
    probs, y = _pool(4000, rng)
    alpha, target, delta = policy.conformal.alpha, policy.abstention.target_risk, policy.abstention.delta
    coverage, violations, answered = [], 0, []
    for _ in range(300):
        idx = rng.permutation(len(y))
        fit, check = idx[:1000], idx[1000:]
        new = refit(policy, probs[fit], y[fit], {})
        f = check_figures(new, probs[check], y[check], {})
        coverage.append(f["coverage"])
        answered.append(f["answered"])
        violations += f["selective_risk"] is not None and f["selective_risk"] > target
    # split conformal: mean coverage >= 1 - alpha, up to three standard errors of the mean over the splits
    assert np.mean(coverage) >= 1 - alpha - 3 * np.std(coverage) / np.sqrt(len(coverage))
    # certified abstention: the error on answered images exceeds the target in at most delta of the draws
    # (plus three binomial standard errors of that share); the check rows' own noise only adds violations
    assert violations / 300 <= delta + 3 * np.sqrt(delta * (1 - delta) / 300)
    assert np.mean(answered) > 0.2  # it does answer: the test would pass vacuously otherwise


@pytest.mark.filterwarnings("ignore::roadwork.errors.RoadworkWarning")  # the tiny model certifies nothing
def test_roadwork_recertify_writes_a_new_signed_version_and_leaves_the_old_one(tiny_run, tmp_path, capsys):
    from roadwork.cli import main
    from roadwork.export.signing import generate_keypair

    _, result = tiny_run
    old = result.bundle
    before = {p.name: p.read_bytes() for p in old.iterdir() if p.is_file()}
    data = pd.read_parquet(result.run_dir / "data" / "dataset.parquet")
    images = result.run_dir / "data"
    manifest = tmp_path / "fresh.csv"
    pd.DataFrame({"path": [str(images / p) for p in data["path"]], "label": data["label"]}).to_csv(
        manifest, index=False
    )
    pub = generate_keypair(tmp_path / "key")
    out = tmp_path / "bundle-v2"
    assert main(["recertify", str(old), str(manifest), f"out={out}", f"key={tmp_path / 'key'}"]) == 0
    printed = capsys.readouterr().out
    assert "policy_version" in printed and str(out) in printed
    new = Bundle.load(out, require_signature=pub)  # verifies, signed
    assert new.policy_version != Bundle.load(old).policy_version
    assert new.manifest["export"]["recertified_from"] == Bundle.load(old).policy_version
    assert {
        p.name: p.read_bytes() for p in old.iterdir() if p.is_file()
    } == before  # the old version untouched
    assert (out / "model.onnx").read_bytes() == (old / "model.onnx").read_bytes()  # the same model files
    # every file's size, new ones and kept ones, recorded (signed with the rest) as the export records them
    assert new.manifest["sizes"] == {n: (out / n).stat().st_size for n in new.manifest["files"]}
    report = json.loads((out / "recertify.json").read_text())
    assert report["fit_rows"] > report["check_rows"] > 0
    # a cascade bundle's /v2 policy (the model alone's) is refitted too, on the model's own outputs
    assert Bundle.load(old).model_policy is not None and set(report["model_alone"]) == {"old", "new"}
    assert new.tensor_policy_file == Bundle.load(old).tensor_policy_file
    assert (out / new.tensor_policy_file).read_bytes() != (old / new.tensor_policy_file).read_bytes()
    assert main(["recertify", str(old), str(manifest), f"out={out}"]) == 2  # never overwrites a version


@pytest.mark.filterwarnings("ignore::roadwork.errors.RoadworkWarning")
def test_recertify_from_the_field_store_uses_the_audit_sample_only(tiny_run, tmp_path, capsys):
    """The store's labelled answers carry their served probabilities: recertify needs no image again, and by
    default only the uniform audit sample is used (people's own choices of what to label are not exchangeable)."""
    from roadwork.cli import main
    from roadwork.field.recertify import recertify_from_store
    from roadwork.field.store import StoredPrediction, open_store

    old = tiny_run[1].bundle
    bundle = Bundle.load(old)
    rng = np.random.default_rng(5)
    probs, y = _pool(1200, rng)
    store = open_store(tmp_path / "field.db")
    rows = [
        StoredPrediction(
            f"id-{i}",
            1000.0 + i,
            bundle.policy_version,
            bundle.classes[int(p.argmax())],
            [float(v) for v in p],
            [],
            False,
            "model",
            {},
            audit=i % 3 != 0,
        )
        for i, p in enumerate(probs)
    ]
    store.add_predictions(rows)
    store.add_labels([(r.id, int(v)) for r, v in zip(rows, y, strict=True)])
    store.close()
    report = recertify_from_store(old, str(tmp_path / "field.db"), out=tmp_path / "v2")
    assert report["source"]["rows"] == sum(r.audit for r in rows)
    assert report["fit_rows"] + report["check_rows"] == report["source"]["rows"]
    assert Bundle.load(tmp_path / "v2").policy_version == report["new"]["policy_version"]
    every = recertify_from_store(old, str(tmp_path / "field.db"), audit_only=False, out=tmp_path / "v3")
    assert every["source"]["rows"] == len(rows)
    # the CLI takes the store as SOURCE; since= a date after every label: nothing to recertify on
    assert main(["recertify", str(old), str(tmp_path / "field.db"), f"out={tmp_path / 'v4'}"]) == 0
    assert "policy_version" in capsys.readouterr().out
    assert main(["recertify", str(old), str(tmp_path / "field.db"), "since=2999-01-01"]) == 2
    assert "no labelled audit answers" in capsys.readouterr().err
    assert main(["recertify", str(old), str(tmp_path / "field.db"), "since=yesterday"]) == 2
    assert "since='yesterday'" in capsys.readouterr().err
    assert main(["recertify", str(old), str(tmp_path / "missing.db")]) == 2  # not created on the way
    assert "no field store" in capsys.readouterr().err and not (tmp_path / "missing.db").exists()
    # the new version serves under the old one's name, states its own answered share, and is a normal folder
    new = Bundle.load(tmp_path / "v2")
    assert new.manifest["name"] == tiny_run[1].run_dir.name
    assert new.manifest["export"]["answers"]["test_n"] == report["check_rows"]
    assert (tmp_path / "v2").stat().st_mode & 0o055 == (old.stat().st_mode & 0o055)
