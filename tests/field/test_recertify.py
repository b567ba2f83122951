"""Recertify: the refitted policy holds its targets over many re-splits, and `roadwork recertify` writes a new,
verifiable (signed) bundle version beside the untouched old one."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from roadwork.export.bundle import Bundle
from roadwork.field.recertify import _figures, _refit


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
        new = _refit(policy, probs[fit], y[fit], {})
        f = _figures(new, probs[check], y[check], {})
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
    report = json.loads((out / "recertify.json").read_text())
    assert report["fit_rows"] > report["check_rows"] > 0
    assert main(["recertify", str(old), str(manifest), f"out={out}"]) == 2  # never overwrites a version
