"""Recertify a deployed bundle on freshly labelled images: a new bundle version with the same model files and a
policy whose conformal threshold, certified abstention and miss-rate control are refitted on the bundle's own
served path. The images come from a folder or manifest (run through the bundle), or from the field store (the
probabilities it stored when it served them: no image is needed again).

The images go through the bundle exactly as it serves them (decode, cascade, calibrator), so the refitted
thresholds are certified for what is served. The rows are split by content hash, as the pipeline splits data:
three quarters fit the policy (the train, val and calib shares of a run), the test quarter checks it; the report
gives both policies' figures on those check rows. The calibrator, the cascade gate and the operating point are kept:
they shape the probabilities the refitted steps are certified on (refitting them on the same rows would need a
split of its own, as a run has; rerun ``roadwork run`` for that). The model-alone policy of ``/v2`` tensors is
kept too (its outputs are the model's, not the served path's). The old version is left untouched; the new
one gets its own ``policy_version`` and, with a key, a signature.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from roadwork.errors import InputError
from roadwork.export.bundle import Bundle, bundle_name, open_image, write_manifest
from roadwork.field.loop import policy_version
from roadwork.jsonio import threshold_to_json
from roadwork.trust.conformal import SplitConformal
from roadwork.trust.policy import TrustPolicy
from roadwork.trust.risk import FalseNegativeControl
from roadwork.trust.selective import certify_abstention

__all__ = ["check_figures", "recertify", "recertify_from_store", "refit"]


def refit(
    policy: TrustPolicy, probs: np.ndarray, y: np.ndarray, slices: dict[str, np.ndarray]
) -> TrustPolicy:
    """The policy with its conformal step and abstention certificate refitted on ``probs`` (served, calibrated)."""
    c = policy.conformal
    conformal = SplitConformal(
        alpha=c.alpha,
        score=c.score,
        randomized=c.randomized,
        mondrian=c.mondrian,
        allow_empty=c.allow_empty,
        k_reg=c.k_reg,
        lam=c.lam,
        label_noise=c.label_noise,
        group_by=c.group_by,
        seed=c.seed,
    ).fit(probs, y, slices.get(c.group_by) if c.group_by else None)
    a = policy.abstention
    pred, conf = policy.decision(probs)
    abstention = certify_abstention(
        conf,
        pred == y,
        target_risk=a.target_risk,
        delta=a.delta,
        n_classes=len(policy.classes),
        method=a.method,  # type: ignore[arg-type]
        groups=slices.get(a.group_by) if a.group_by else None,
        group_by=a.group_by,
    )
    fnr = policy.risk_control
    if fnr is not None:  # the miss-rate control, refitted at its own alpha on the same rows
        fnr = FalseNegativeControl(
            alpha=fnr.alpha, positive=fnr.positive, group_by=fnr.group_by, min_count=fnr.min_count
        ).fit(probs, y, slices.get(fnr.group_by) if fnr.group_by else None)
    return dataclasses.replace(policy, conformal=conformal, abstention=abstention, risk_control=fnr)


def check_figures(
    policy: TrustPolicy, probs: np.ndarray, y: np.ndarray, slices: dict[str, np.ndarray]
) -> dict[str, Any]:
    """Coverage, share answered and error on answered of ``policy`` on rows it was not fitted on."""
    groups = slices or None
    sets = policy.conformal.predict_sets(
        probs, groups.get(policy.conformal.group_by) if groups and policy.conformal.group_by else None
    )
    pred, conf = policy.decision(probs)
    abstain = conf < policy.abstention.thresholds(
        slices.get(policy.abstention.group_by) if policy.abstention.group_by else None, len(probs)
    )
    answered = ~abstain
    out: dict[str, Any] = {
        "n": len(y),
        "coverage": float(sets[np.arange(len(y)), y].mean()) if len(y) else None,
        "answered": float(answered.mean()) if len(y) else None,
        "selective_risk": float((pred[answered] != y[answered]).mean()) if answered.any() else None,
    }
    fnr = policy.risk_control
    if fnr is not None:
        pos = y == fnr.positive
        flagged = fnr.predict(probs, slices.get(fnr.group_by) if fnr.group_by else None)
        out["miss_rate"] = float((~flagged[pos]).mean()) if pos.any() else None
    return out


def recertify(
    bundle_dir: str | Path,
    paths: list[str],
    labels: list[str],
    *,
    out: str | Path | None = None,
    key: str | Path | None = None,
    slices: dict[str, list[str]] | None = None,
) -> dict[str, Any]:
    """Write a new bundle version recertified on ``paths`` labelled ``labels`` (class names); returns the report
    (old and new certificates, both policies on the check rows, the new folder and policy_version)."""
    _check_key(key)
    bundle = Bundle.load(bundle_dir)
    y = _label_indices(bundle, labels)
    sl = {k: np.asarray(v, dtype=str) for k, v in (slices or {}).items()}
    probs = bundle.predict_output(paths, slices={k: list(v) for k, v in sl.items()} or None).probs
    digest = [hashlib.sha256(Path(p).read_bytes()).digest()[0] for p in paths]
    check = np.array([d < 64 for d in digest])  # a quarter, by content: the same image is always on one side
    alone = None
    if bundle.model_policy is not None:  # /v2 tensors: the model alone's outputs, through its own calibrator
        logits = np.concatenate(
            [
                bundle.logits([open_image(p, bundle.decode_side) for p in paths[i : i + 64]])
                for i in range(0, len(paths), 64)
            ]
        )
        alone = (
            bundle.tensor_policy.apply(logits, {k: list(v) for k, v in sl.items()} or None).probs,
            y,
            sl,
            check,
        )
    note = {"source": "images", "rows": len(paths)}
    return _recertify(bundle, probs, y, sl, check, out, key, note, alone)


def recertify_from_store(
    bundle_dir: str | Path,
    where: str,
    *,
    since: float | None = None,
    audit_only: bool = True,
    out: str | Path | None = None,
    key: str | Path | None = None,
) -> dict[str, Any]:
    """The same from the field store (``feedback_db``): the labelled answers this bundle served (its
    ``policy_version``) with the probabilities stored when they were answered, and their labels, since ``since``
    (a UNIX time of the label).
    ``audit_only`` (default): only the uniform audit sample, which is exchangeable with the traffic; labels people
    chose to send (what looked wrong) are not, and would certify for the wrong population."""
    from roadwork.field.store import open_store

    _check_key(key)
    if not where.startswith(("postgresql://", "postgres://")) and not Path(where).is_file():
        raise InputError(f"recertify: no field store at {where!r}; pass the server's feedback_db.")
    bundle = Bundle.load(bundle_dir)
    store = open_store(where)
    try:
        rows = store.labelled(audit_only=audit_only, since=since)
    finally:
        store.close()
    # the answers this bundle's served path decided (its policy_version): their stored probabilities are that
    # path's; /v2 answers of a cascade bundle (the model alone's version) and other models' rows are left out
    every = rows
    rows = [(p, y) for p, y in rows if p.policy_version == bundle.policy_version]
    if not rows:
        raise InputError(
            f"recertify: the store {where!r} holds no labelled {'audit ' if audit_only else ''}answers served "
            f"under this bundle's policy_version {bundle.policy_version}{' since then' if since is not None else ''}; "
            "label the audit sample (POST /v1/feedback) first."
        )
    columns = bundle.policy.slice_columns
    probs, y, sl, check = _rows_arrays(rows, columns)
    note = {"source": "feedback store", "rows": len(rows), "audit_only": audit_only, "since": since}
    alone = None
    v2_rows = [(p, y) for p, y in every if p.policy_version == bundle.tensor_policy_version]
    if bundle.model_policy is not None:
        note["v2_rows"] = len(v2_rows)
        if len(v2_rows) >= 100:  # the /v2 answers' own stored probabilities refit the model-alone policy
            alone = _rows_arrays(v2_rows, columns)
    return _recertify(bundle, probs, y, sl, check, out, key, note, alone)


def _rows_arrays(
    rows: list[tuple[Any, int]], columns: list[str]
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """Stored answers → probabilities, labels, slice columns and the check quarter (by id)."""
    probs = np.array([p.probs for p, _ in rows], dtype=np.float64)
    probs /= probs.sum(axis=1, keepdims=True)  # stored rounded to 6 decimals
    y = np.array([int(v) for _, v in rows])
    sl = {c: np.array([p.meta.get(c, "") for p, _ in rows], dtype=str) for c in columns}
    check = np.array([hashlib.sha256(p.id.encode()).digest()[0] < 64 for p, _ in rows])
    return probs, y, sl, check


def _check_key(key: str | Path | None) -> None:
    if key is not None:  # a wrong key is said before the images are run, not after
        from roadwork.export.signing import load_private_key

        load_private_key(key)


def _label_indices(bundle: Bundle, labels: list[str]) -> np.ndarray:
    classes = bundle.classes
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        raise InputError(f"recertify: labels {unknown[:5]} are not classes of this bundle ({classes}).")
    return np.array([classes.index(v) for v in labels])


def _recertify(
    bundle: Bundle,
    probs: np.ndarray,
    y: np.ndarray,
    sl: dict[str, np.ndarray],
    check: np.ndarray,
    out: str | Path | None,
    key: str | Path | None,
    source: dict[str, Any],
    alone: tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], np.ndarray] | None = None,
) -> dict[str, Any]:
    """Refit on the rows outside ``check``, compare old and new on ``check``, write the new version. ``alone``:
    the model-alone outputs (probabilities, labels, slices, check rows) that refit a cascade bundle's ``/v2``
    policy; None keeps it (said in the report)."""
    if len(y) < 100:
        raise InputError(
            f"recertify: {len(y)} labelled images; it needs at least 100 (a few hundred for a certificate that "
            "answers much): label more."
        )
    fit = ~check
    new = refit(bundle.policy, probs[fit], y[fit], {k: v[fit] for k, v in sl.items()})
    on_check = {k: v[check] for k, v in sl.items()}
    report: dict[str, Any] = {
        "source": source,
        "old": {
            "policy_version": bundle.policy_version,
            "conformal_threshold": threshold_to_json(float(bundle.policy.conformal.threshold_)),
            "abstention": bundle.policy.abstention.to_dict(),
            "check": check_figures(bundle.policy, probs[check], y[check], on_check),
        },
        "new": {
            "conformal_threshold": threshold_to_json(float(new.conformal.threshold_)),
            "abstention": new.abstention.to_dict(),
            "check": check_figures(new, probs[check], y[check], on_check),
        },
        "fit_rows": int(fit.sum()),
        "check_rows": int(check.sum()),
    }
    new_alone = None
    if alone is not None and bundle.model_policy is not None:
        a_probs, a_y, a_sl, a_check = alone
        a_fit = ~a_check
        new_alone = refit(
            bundle.model_policy, a_probs[a_fit], a_y[a_fit], {k: v[a_fit] for k, v in a_sl.items()}
        )
        on = {k: v[a_check] for k, v in a_sl.items()}
        report["model_alone"] = {
            "old": check_figures(bundle.model_policy, a_probs[a_check], a_y[a_check], on),
            "new": check_figures(new_alone, a_probs[a_check], a_y[a_check], on),
        }
    elif bundle.model_policy is not None:
        report["model_alone"] = {"kept": "fewer than 100 labelled /v2 answers: /v2 keeps its certificate"}
    report["bundle"], report["new"]["policy_version"] = _write_version(
        bundle, new, out, key, report, new_alone
    )
    return report


def _write_version(
    bundle: Bundle,
    policy: TrustPolicy,
    out: str | Path | None,
    key: str | Path | None,
    report: dict[str, Any],
    alone: TrustPolicy | None = None,
) -> tuple[str, str]:
    """The new version: the old version's verified files (one read), the new policy and manifest, a signature with
    a key; staged next to the target and moved into place whole. Variants and a runtime selection are not carried
    over (their policies were certified on the old data): the new version serves fp32. The report goes in as
    ``recertify.json``, hashed and signed with the rest."""
    from roadwork.export.snapshot import snapshot

    source = Path(bundle.path)
    policy_bytes = json.dumps(policy.to_dict(), indent=2).encode()
    version = policy_version(policy_bytes)
    target = Path(out) if out is not None else source.parent / f"{source.name}-{version}"
    if target.exists():
        raise InputError(f"recertify: {str(target)!r} exists already; pass out=ANOTHER_FOLDER.")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # a folder like any other (mkdtemp's is private to this user)
    try:
        with snapshot(source) as snap:
            manifest = json.loads(snap.raw_manifest)
            variants = manifest.pop("variants", {})
            dropped = {v.get(k) for v in variants.values() for k in ("file", "policy", "model_policy")}
            dropped |= {"runtime.json"}
            manifest["files"] = {
                n: d for n, d in manifest["files"].items() if n not in dropped or n == "model.onnx"
            }
            manifest["sizes"] = {n: snap.sizes[n] for n in manifest["files"]}  # of the verified bytes
            for name in manifest["files"]:
                shutil.copyfile(snap.dir / name, staging / name)
        (staging / "policy.json").write_bytes(policy_bytes)
        written = ["policy.json", "recertify.json"]
        if alone is not None:  # the /v2 model-alone policy, refitted too
            name = str(manifest["export"]["model_policy"]["file"])
            (staging / name).write_text(json.dumps(alone.to_dict(), indent=2))
            written.append(name)
        record = json.dumps(
            report | {"bundle": str(target), "new": report["new"] | {"policy_version": version}}, indent=2
        )
        (staging / "recertify.json").write_text(record)
        export = manifest.setdefault("export", {})
        export["recertified_from"] = bundle.policy_version
        check = report["new"]["check"]
        export["answers"] = {  # what the new policy answers (the old figures would be stated as its own)
            "test": check["answered"],
            "test_n": check["n"],
            "calib": policy.abstention.coverage,
            "calib_n": policy.abstention.n,
            "target_risk": policy.abstention.target_risk,
            "delta": policy.abstention.delta,
        }
        manifest["name"] = bundle_name(bundle.manifest, bundle.path)  # every version serves under one name
        write_manifest(staging, manifest, written)
        if key is not None:
            from roadwork.export.signing import sign_bundle

            sign_bundle(staging, key)
        Bundle.load(staging)  # the new version verifies and opens before it is put in place
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return str(target), version
