"""The stage functions of the main job and their graph.

    data → train → predict → calibrate → conformal, selective → policy → cascade_models → cascade → export
    → evaluate   (the cascade's two stages live in :mod:`roadwork.pipeline.cascade_stages`)

Each function reads its inputs' folders and writes into ``ctx.out``; see :mod:`roadwork.pipeline.runner`.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from roadwork.config import CalibrateConfig, DataConfig, RunConfig, dump_config
from roadwork.errors import ConfigError, RoadworkWarning
from roadwork.jsonio import write_json
from roadwork.pipeline.artifacts import (
    SPLITS_PREDICTED,
    abs_paths,
    decode_side_for,
    label_indices,
    load_calibrator,
    load_cascade,
    load_dataset,
    load_predictions,
    read_json,
    slice_columns,
    split_rows,
    stage_manifest,
    stage_outputs,
)
from roadwork.pipeline.cascade_stages import cascade_auto_key, stage_cascade, stage_cascade_models
from roadwork.pipeline.runner import Stage, StageContext
from roadwork.trust import Predictions, SplitConformal, TrustPolicy, make_calibrator, softmax
from roadwork.trust.calibration import calibrate_proba
from roadwork.trust.cascade import Cascade
from roadwork.trust.selective import AbstentionCertificate

__all__ = [
    "STAGES",
    "served_calib",
    "stage_calibrate",
    "stage_conformal",
    "stage_data",
    "stage_evaluate",
    "stage_export",
    "stage_policy",
    "stage_predict",
    "stage_selective",
    "stage_train",
]


def _dir_digest(d: Path) -> str:
    """The data stage's manifest digest (what the cache key uses), or the folder name."""
    try:
        return str(json.loads((d / "manifest.json").read_text())["digest"])
    except (OSError, ValueError, KeyError):
        return hashlib.sha256(str(d).encode()).hexdigest()


# --------------------------------------------------------------------------------------------- data


def _source_fingerprint(cfg: RunConfig) -> str:
    """For folders and manifests: a hash of every file's path, size and mtime (cheap, no reading)."""
    if cfg.data.source == "synthetic":
        return "synthetic"
    src = Path(cfg.data.source)
    h = hashlib.sha256(str(src.resolve()).encode("utf-8", "surrogateescape"))  # any name the OS gives
    if src.is_dir():
        files = sorted(p for p in src.rglob("*") if p.is_file())
    elif src.is_file():
        files = [src]
    else:
        return "missing"
    for p in files:
        st = p.stat()
        name = p.relative_to(src) if src.is_dir() else p.name
        h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def stage_data(ctx: StageContext) -> dict[str, Any]:
    """dataset.parquet (one row per usable image, with its split and slice columns) and data_report.json."""
    from roadwork.data.sources import build_dataset
    from roadwork.data.synthetic import generate_dataset

    d = ctx.cfg.data
    rows, root = None, None
    if d.source == "synthetic":
        root = ctx.out / "images"
        rows = generate_dataset(root, d.synthetic, progress=ctx.progress)
    df, classes, report = build_dataset(d, synthetic_rows=rows, synthetic_root=root)
    if root is not None:  # paths inside the run folder are stored relative, so the folder can move
        df["path"] = [f"images/{Path(p).name}" for p in df["path"]]
    df.to_parquet(ctx.out / "dataset.parquet", index=False)
    rep = {"classes": classes, "source": d.source, **report.to_dict()}
    (ctx.out / "data_report.json").write_text(json.dumps(rep, indent=2))
    return {"n": report.n_used, "skipped": len(report.skipped), "classes": classes}


# --------------------------------------------------------------------------------------------- train


def _readable_unlabeled(paths: list[str], data: DataConfig, folder: str, progress: bool) -> list[str]:
    """The unlabelled images the data stage would keep (:func:`~roadwork.data.sources.check_images`: regular
    files, decodable, within ``data.max_pixels`` and ``data.max_file_mb``); the others are skipped with a warning,
    as the data stage lists them: one odd file (a FIFO, a truncated JPEG) never ends the run."""
    from roadwork.data.listing import shown
    from roadwork.data.sources import check_images

    checked = [(p, why) for p, (_digest, why) in zip(paths, check_images(paths, data, progress), strict=True)]
    bad = [(p, why) for p, why in checked if why]
    if bad:
        shown_bad = "; ".join(f"{shown(p)}: {why}" for p, why in bad[:3])
        warnings.warn(
            f"explora: {len(bad)} of {len(paths)} files in train.unlabeled are skipped ({shown_bad}"
            f"{'; ...' if len(bad) > 3 else ''}).",
            RoadworkWarning,
            stacklevel=2,
        )
    good = [p for p, why in checked if not why]
    if not good:
        raise ConfigError(
            f"train.unlabeled={folder!r} holds no readable image (of {len(paths)} files); pass a folder of "
            "JPEG/PNG/WebP photos."
        )
    return good


def _explora(ctx: StageContext) -> Path:
    """ExPLoRA step (a) on ``train.unlabeled``; the backbone it returns starts the supervised training."""
    from roadwork._deps import require
    from roadwork.data.listing import list_images
    from roadwork.data.preprocess import PreprocessSpec
    from roadwork.training.explora import explora_pretrain
    from roadwork.training.loop import load_uint8

    t = ctx.cfg.train
    if not t.unlabeled or not Path(t.unlabeled).exists():
        raise ConfigError(
            f"train.recipe=explora needs train.unlabeled=FOLDER of unlabelled target-domain images; got {t.unlabeled!r}."
        )
    listed = list_images([t.unlabeled])["path"].tolist()
    paths = _readable_unlabeled(listed, ctx.cfg.data, t.unlabeled, ctx.progress)
    u8 = load_uint8(paths, PreprocessSpec(size=ctx.cfg.model.image_size), "explora: unlabelled", ctx.progress)
    state, history = explora_pretrain(
        ctx.cfg.model,
        u8,
        epochs=t.ssl_epochs,
        batch_size=t.batch_size,
        unfreeze_last=t.explora_unfreeze,
        lora_rank=t.lora_rank,
        seed=t.seed,
    )
    out = ctx.out / "explora-backbone.safetensors"
    require("safetensors.torch").save_file({k: v.contiguous() for k, v in state.items()}, str(out))
    (ctx.out / "explora-history.json").write_text(json.dumps(history, indent=2))
    return out


def stage_train(ctx: StageContext) -> dict[str, Any]:
    """Train the model on the train split (early stopping on val): its weights, card, history and curves."""
    from roadwork.evaluation.plots import training_png
    from roadwork.models.factory import save_model
    from roadwork.pipeline.certify import check_policy_classes
    from roadwork.training.loop import save_history, train_model

    df, classes = load_dataset(ctx.inputs["data"])
    check_policy_classes(ctx.cfg.policy, classes)  # class-dependent keys fail here, not after training
    tr, va = df[df["split"] == "train"], df[df["split"] == "val"]

    def on_epoch(epoch: int, row: dict[str, float]) -> None:
        if ctx.tracker is not None:
            ctx.tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
        if ctx.on_epoch is not None:
            ctx.on_epoch(epoch, row)

    # one folder per data version: a checkpoint of other data is never resumed (the config is checked too)
    checkpoints = ctx.cfg.run_dir / "checkpoints" / f"train-{_dir_digest(ctx.inputs['data'])[:12]}"
    init_backbone = _explora(ctx) if ctx.cfg.train.recipe == "explora" else None
    # decoded images cached under ROOT/cache, keyed on their sha256 and the preprocessing: the next run reuses it
    train_cfg = ctx.cfg.train.model_copy(
        update={"cache_dir": ctx.cfg.train.cache_dir or str(Path(ctx.cfg.root) / "cache")}
    )
    res = train_model(
        ctx.cfg.model,
        train_cfg,
        classes=classes,
        train_paths=abs_paths(tr, ctx.inputs["data"]),
        train_labels=label_indices(tr, classes),
        val_paths=abs_paths(va, ctx.inputs["data"]),
        val_labels=label_indices(va, classes),
        on_epoch=on_epoch,
        progress=ctx.progress,
        checkpoint_dir=checkpoints,  # outside the stage's temp folder, so an interrupted run resumes
        init_backbone=init_backbone,
        train_digests=tr["sha256"].tolist() if "sha256" in tr else None,
        val_digests=va["sha256"].tolist() if "sha256" in va else None,
    )
    save_model(res.model, res.card, ctx.out)
    save_history(res.history, ctx.out / "history.json")
    shutil.rmtree(
        checkpoints, ignore_errors=True
    )  # the stage's outputs are complete; the checkpoint is spent
    (ctx.out / "training.png").write_bytes(training_png(res.history))
    last = res.history[res.best_epoch - 1] if res.best_epoch else res.history[-1]
    return {
        "best_epoch": res.best_epoch,
        "epochs_run": len(res.history),
        "val_loss": last["val_loss"],
        "val_accuracy": last["val_accuracy"],
        "finetune": ctx.cfg.train.finetune,
        "trainable_params": res.trainable_params,
    }


# --------------------------------------------------------------------------------------------- predict


def stage_predict(ctx: StageContext) -> dict[str, Any]:
    """The model's logits on the val, calib and test splits (predictions-SPLIT.parquet)."""
    from roadwork.models.factory import load_model
    from roadwork.training.loop import load_uint8, predict_logits

    df, classes = load_dataset(ctx.inputs["data"])
    model, card = load_model(ctx.inputs["train"])
    counts = {}
    for split in SPLITS_PREDICTED:
        part = df[df["split"] == split]
        u8 = load_uint8(
            abs_paths(part, ctx.inputs["data"]),
            card.preprocess,
            f"reading {split}",
            ctx.progress,
            min_side=decode_side_for(ctx.cfg, card.preprocess),
        )
        logits = predict_logits(model, u8, card.preprocess)
        Predictions(
            part["id"].to_numpy(),
            label_indices(part, classes),
            logits.reshape(len(part), len(classes)),
            classes,
            slice_columns(part),
        ).to_parquet(ctx.out / f"predictions-{split}.parquet")
        counts[split] = len(part)
    return counts


def _preds(ctx: StageContext, split: str) -> Predictions:
    return load_predictions(ctx.inputs["predict"], split)


# --------------------------------------------------------------------------------------------- trust
# What is served is what is certified: see roadwork.pipeline.certify for the construction (which calibration rows
# fit the calibrators, which certify a cascade's gate, which fit the policy's thresholds on the served outputs).


def _calibration_checks(c: CalibrateConfig, cal: Predictions) -> tuple[bool, dict[str, Any]]:
    """Does calibration help on held-out calibration rows? 5-fold cross-validation on the calibrator rows:
    NLL and ECE of the fitted method vs the raw softmax. Returns (keep the method, the figures)."""
    from roadwork.pipeline.certify import fit_calibrator
    from roadwork.trust import metrics as M

    if c.method == "none" or len(cal) < 50:
        return True, {}
    folds = np.arange(len(cal)) % 5
    folds = np.random.default_rng(0).permutation(folds)
    cv = np.zeros((len(cal), cal.n_classes))
    for f in range(5):
        fit, held = folds != f, folds == f
        part = cal.subset(fit)
        try:
            cv[held] = calibrate_proba(
                fit_calibrator(c, part),
                cal.logits[held],
                {k: v[held] for k, v in cal.slices.items()},
            )
        except Exception:  # a fold too small for the method: no verdict
            return True, {}
    raw = softmax(cal.logits)
    figures = {
        "cv_nll_calibrated": M.nll(cv, cal.labels),
        "cv_nll_uncalibrated": M.nll(raw, cal.labels),
        "cv_ece_calibrated": M.ece(cv, cal.labels),
        "cv_ece_uncalibrated": M.ece(raw, cal.labels),
    }
    keep = figures["cv_nll_calibrated"] <= figures["cv_nll_uncalibrated"]
    return keep, figures


def _pinned_share(calibrator: Any, fit: Predictions) -> float:
    """The share of the calibrator's rows whose calibrated top probability is exactly 1.0 in float64."""
    if len(fit) == 0:
        return 0.0
    probs = calibrate_proba(calibrator, fit.logits, fit.slices)
    return float((probs.max(axis=1) >= 1.0).mean())


def stage_calibrate(ctx: StageContext) -> dict[str, Any]:
    """Fit the calibrator on the calibrator rows of the calibration split, checked by cross-validation."""
    from roadwork.pipeline.certify import fit_calibrator, fit_fraction, row_split

    cal = _preds(ctx, "calib")
    c = ctx.cfg.calibrate
    fraction = fit_fraction(ctx.cfg)
    rows = row_split(cal.ids, fraction, None).calibrator
    if fraction < 1 and (rows.sum() < 20 or (~rows).sum() < 20):
        raise ConfigError(
            f"calibrate.fit_fraction={fraction:g} leaves {int(rows.sum())} calibration rows for the calibrator "
            f"and {int((~rows).sum())} for the conformal threshold; each needs at least 20. Use more data or "
            "calibrate.fit_fraction=1 (share all rows)."
        )
    fit = cal.subset(rows)
    calibrator = fit_calibrator(c, fit)
    keep, figures = _calibration_checks(c, fit)
    warnings_: list[str] = []
    if not keep:
        warnings_.append(
            f"Calibration ({c.method}) made held-out NLL worse in 5-fold cross-validation on the calibration rows "
            f"({figures['cv_nll_calibrated']:.4f} vs {figures['cv_nll_uncalibrated']:.4f} uncalibrated), so the "
            "uncalibrated probabilities are kept (calibrate.method=none). The model's confidence carries little "
            "signal: add data or train a stronger model (a pretrained backbone)."
        )
        calibrator = make_calibrator("none").fit(fit.logits, fit.labels)
    elif figures and figures["cv_ece_calibrated"] > figures["cv_ece_uncalibrated"]:
        warnings_.append(
            f"Calibration ({c.method}) lowers held-out NLL but raises held-out ECE in cross-validation on the "
            f"calibration rows ({figures['cv_ece_uncalibrated']:.3f} → {figures['cv_ece_calibrated']:.3f}). Try "
            "calibrate.method=auto, or more calibration data."
        )
    pinned = _pinned_share(calibrator, fit)
    if pinned > 0.5:
        warnings_.append(
            f"Calibration ({calibrator.to_dict().get('kind', c.method)}) pins probabilities to 0 or 1: "
            f"{pinned:.0%} of the calibration rows get a top probability of exactly 1.0. The calibration split is "
            "separable (the model makes no mistake on it, or it is very small), so the fitted calibrator is "
            "extreme and served probabilities carry no ranking for abstention or sets. Add calibration images, "
            "or use calibrate.method=none."
        )
    write_json(ctx.out / "calibrator.json", calibrator.to_dict())
    trust_rows = row_split(
        cal.ids, fraction, None
    ).policy  # without a cascade every trust row fits the policy
    split = {"fit_fraction": fraction, "n_calibrator": int(rows.sum()), "n_trust": int(trust_rows.sum())}
    write_json(ctx.out / "split.json", split)
    write_json(ctx.out / "checks.json", {"kept": keep, **figures, "warnings": warnings_})
    return {**calibrator.to_dict(), "rows": split, "warnings": warnings_}


def served_calib(ctx: StageContext) -> tuple[Predictions, np.ndarray, Cascade | None, list[np.ndarray]]:
    """The policy rows of the calibration split and the served path's calibrated probabilities on them (the
    cascade's composite when there is one), with the cascade and its earlier stages' outputs on those rows."""
    from roadwork.pipeline.certify import fit_fraction, row_split, served_probs

    cal = _preds(ctx, "calib")
    cascade = load_cascade(ctx.inputs["cascade"])
    gate = ctx.cfg.cascade.gate_fraction if cascade is not None else None
    split = row_split(cal.ids, fit_fraction(ctx.cfg), gate)
    pol = cal.subset(split.policy)
    if cascade is not None and len(cascade.stages) < 2:
        cascade = None
    early = (
        []
        if cascade is None
        else [
            stage_outputs(ctx.inputs["cascade_models"], st, "calib")[split.policy]
            for st in cascade.stages[:-1]
        ]
    )
    probs, _ = served_probs(load_calibrator(ctx.inputs["calibrate"]), cascade, early, pol.logits, pol.slices)
    return pol, probs, cascade, early


def stage_conformal(ctx: StageContext) -> dict[str, Any]:
    """The conformal threshold on the policy rows, on the served path's calibrated probabilities."""
    from roadwork.pipeline.certify import fit_conformal

    cal, probs, _, _ = served_calib(ctx)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RoadworkWarning)
        conf = fit_conformal(ctx.cfg.conformal, probs, cal)
    notes = [str(w.message) for w in caught]
    if math.isinf(conf.threshold_):
        need = math.ceil(1 / conf.alpha - 1)
        notes.append(
            f"The conformal threshold is unbounded: {cal.labels.size} calibration rows are too few for "
            f"conformal.alpha={conf.alpha:g} (at least {need} per group are needed), so every prediction set is "
            "the full label set. Raise conformal.alpha or add calibration data."
        )
    write_json(ctx.out / "conformal.json", conf.to_dict())
    return {**conf.to_dict(), "warnings": notes}


def stage_selective(ctx: StageContext) -> dict[str, Any]:
    """The abstention certificate on the policy rows, on the served path's calibrated probabilities."""
    from roadwork.pipeline.certify import (
        abstention_warnings,
        fit_abstention,
        fit_operating_point_of,
        positive_class,
        served_decision,
    )

    cal, probs, _, _ = served_calib(ctx)
    pc = ctx.cfg.policy
    op = fit_operating_point_of(pc, probs, cal)  # certified for the decision served (the operating point's)
    positive = positive_class(cal.classes, pc.positive_class)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always", RoadworkWarning)  # said once, with advice, below
        cert = fit_abstention(ctx.cfg.selective, probs, cal, op, positive)
    write_json(ctx.out / "selective.json", cert.to_dict())
    pred, conf = served_decision(probs, cal.classes, op, positive)
    decision = "argmax" if op is None else f"operating point ({op.criterion}, threshold {op.threshold:.4f})"
    return {
        **cert.to_dict(),
        "decision": decision,
        "warnings": abstention_warnings(cert, conf, pred == cal.labels, cal.n_classes),
    }


def stage_policy(ctx: StageContext) -> dict[str, Any]:
    """The trust policy: calibrator, conformal sets, abstention, binary risk control and the cascade."""
    from roadwork.pipeline.certify import fit_risk, positive_class

    cal, probs, cascade, _ = served_calib(ctx)
    op, fnr = fit_risk(ctx.cfg.policy, probs, cal)
    policy = TrustPolicy(
        classes=cal.classes,
        calibrator=load_calibrator(ctx.inputs["calibrate"]),
        conformal=SplitConformal.from_dict(read_json(ctx.inputs["conformal"] / "conformal.json")),
        abstention=AbstentionCertificate.from_dict(read_json(ctx.inputs["selective"] / "selective.json")),
        positive_class=positive_class(cal.classes, ctx.cfg.policy.positive_class),
        operating_point=op,
        risk_control=fnr,
        cascade=cascade,
    )
    policy.save(ctx.out / "policy.json")
    return {
        "classes": cal.classes,
        "positive_class": policy.positive_class,
        "operating_point": op and op.to_dict(),
        "risk_control": fnr and fnr.to_dict(),
        "served": "cascade " + " → ".join(cascade.names) if cascade is not None else "model alone",
        "n_policy_rows": len(cal),
    }


# --------------------------------------------------------------------------------------------- export


def _parity_export(
    ctx: StageContext, model: Any, card: Any, x: np.ndarray, onnx_path: Path
) -> dict[str, Any]:
    """Export the model to ONNX and check it against torch on the very inputs the bundle will see."""
    from roadwork._deps import require
    from roadwork.errors import ArtifactError
    from roadwork.export.onnx import export_onnx, onnx_logits, onnx_session

    e = ctx.cfg.export
    exporter = export_onnx(model, x, onnx_path, opset=e.opset, exporter=e.exporter)
    torch = require("torch")
    with torch.inference_mode():  # the reference: the torch model on the very inputs the bundle will see
        ref = model(torch.from_numpy(x)).double().numpy()
    got = onnx_logits(onnx_session(onnx_path), x)
    max_diff = float(np.abs(ref - got).max()) if len(x) else 0.0
    if max_diff > e.parity_atol:
        raise ArtifactError(
            f"ONNX parity check failed: max |logit difference| {max_diff:.2e} exceeds "
            f"export.parity_atol={e.parity_atol:g}. The exported graph is not trustworthy."
        )
    if e.tensorrt:
        from roadwork.export.variants import tensorrt_available

        if not tensorrt_available():
            raise ConfigError(
                "export.tensorrt=true needs an NVIDIA GPU and ONNX Runtime's TensorRT execution provider "
                "(pip install onnxruntime-gpu tensorrt); this machine has neither. Set export.tensorrt=false."
            )
    return {"exporter": exporter, "opset": e.opset, "parity_max_abs_diff": max_diff, "parity_n": len(x)}


def _cascade_files(ctx: StageContext, policy: TrustPolicy, info: dict[str, Any]) -> dict[str, Path]:
    """The earlier cascade stages' model files (and cards) the bundle ships, recorded in ``info``."""
    extra: dict[str, Path] = {}
    if policy.cascade is not None:
        for st in policy.cascade.stages[:-1]:
            for name in (st.file, st.info.get("card")):
                if name:
                    extra[name] = ctx.inputs["cascade_models"] / name
        info["cascade"] = {"stages": policy.cascade.names, "threshold": policy.cascade.threshold}
    return extra


def _int8_variant(
    ctx: StageContext, card: Any, policy: TrustPolicy, onnx_path: Path, side: int
) -> tuple[Path, dict[str, Any], Path]:
    """The int8 model, certified with its own policy on its own outputs (precision changes the outputs):
    its file, its export info and its policy file."""
    from roadwork.data.preprocess import load_rgb, preprocess
    from roadwork.export.variants import quantize_int8

    e = ctx.cfg.export
    calib_x = None
    if e.int8 == "static":
        df, _ = load_dataset(ctx.inputs["data"])
        rows = split_rows(df, "train").head(e.int8_calibration_images)
        calib_x = preprocess(
            [load_rgb(p, side) for p in abs_paths(rows, ctx.inputs["data"])], card.preprocess
        )
    q_path = ctx.out / "model-int8.onnx.tmp"
    mode: Literal["dynamic", "static"] = (
        "static" if e.int8 == "static" else "dynamic"
    )  # int8 is not none here
    q_info = quantize_int8(onnx_path, q_path, mode=mode, calibration=calib_x)
    q_policy, q_report = _variant_policy(ctx, card, policy, q_path)
    q_policy_path = ctx.out / "policy-int8.json"
    q_policy.save(q_policy_path)
    info = q_info | {"runtime": "onnxruntime", "precision": "int8", "policy": "policy-int8.json"}
    _save_model_alone(ctx, "int8", q_report, info)
    info["certified_on"] = q_report["rows"]
    info |= _variant_quality(ctx, card, {"fp32": (onnx_path, policy), "int8": (q_path, q_policy)})
    info["size_mb"] = round(q_path.stat().st_size / 2**20, 3)
    info["warnings"] = q_report["warnings"]
    return q_path, info, q_policy_path


def _openvino_variants(
    ctx: StageContext, card: Any, policy: TrustPolicy, onnx_path: Path, info: dict[str, Any]
) -> dict[str, tuple[dict[str, Any], Path, Path | None]]:
    """The same model.onnx through OpenVINO (fp32, bf16; int8 quantised by NNCF): each certified on its own
    outputs, here (a precision this CPU lacks is recorded in ``info['variants_skipped']``). Returns each
    variant's info, policy file and model file (``None``: model.onnx itself)."""
    from roadwork.export.runtime import RuntimeSpec, cpu_summary, runtime_status

    out: dict[str, tuple[dict[str, Any], Path, Path | None]] = {}
    for spec in (
        RuntimeSpec("openvino", "fp32"),
        RuntimeSpec("openvino", "bf16"),
        RuntimeSpec("openvino", "int8"),
    ):
        status = runtime_status(spec)
        if status != "ok":
            if spec.precision == "fp32":
                raise ConfigError(f"export.openvino=true: {status}. Install it or set export.openvino=false.")
            info.setdefault("variants_skipped", {})[spec.name] = status
            continue
        model_path: Path = onnx_path
        v_info: dict[str, Any] = {"runtime": spec.runtime, "precision": spec.precision}
        if spec.precision == "int8":  # NNCF post-training int8, calibrated on training images
            model_path, v_info = _openvino_int8(ctx, card, onnx_path, v_info)
        v_policy, v_report = _variant_policy(ctx, card, policy, model_path, runtime=spec)
        pname = f"policy-{spec.name}.json"
        v_policy.save(ctx.out / pname)
        v_info = v_info | {"policy": pname}
        _save_model_alone(ctx, spec.name, v_report, v_info)
        v_info |= {
            "certified_on": v_report["rows"],
            "certified_cpu": cpu_summary(),
            "warnings": v_report["warnings"],
        }
        out[spec.name] = (v_info, ctx.out / pname, None if model_path == onnx_path else model_path)
    return out


def _openvino_int8(
    ctx: StageContext, card: Any, onnx_path: Path, v_info: dict[str, Any]
) -> tuple[Path, dict[str, Any]]:
    """model.onnx quantised by NNCF (an OpenVINO IR, xml + bin) on ``export.int8_calibration_images`` training
    images decoded and preprocessed as served."""
    from roadwork.data.preprocess import load_rgb, preprocess
    from roadwork.export.variants import quantize_openvino_int8

    df, _ = load_dataset(ctx.inputs["data"])
    rows = split_rows(df, "train").head(ctx.cfg.export.int8_calibration_images)
    side = decode_side_for(ctx.cfg, card.preprocess)
    x = preprocess([load_rgb(p, side) for p in abs_paths(rows, ctx.inputs["data"])], card.preprocess)
    path = ctx.out / "model-openvino-int8.tmp.xml"
    v_info = v_info | quantize_openvino_int8(onnx_path, path, calibration=x)
    return path, v_info


def stage_export(ctx: StageContext) -> dict[str, Any]:
    """The bundle: the model in ONNX (parity-checked against torch), the policy, the cascade's earlier stages,
    the drift reference and the variants (int8, OpenVINO), each certified with its own policy."""
    from roadwork.data.preprocess import load_rgb, preprocess
    from roadwork.export.bundle import write_bundle
    from roadwork.models.factory import load_model

    e = ctx.cfg.export
    model, card = load_model(ctx.inputs["train"])
    df, _ = load_dataset(ctx.inputs["data"])
    test = split_rows(df, "test").head(e.parity_samples)
    side = decode_side_for(ctx.cfg, card.preprocess)
    x = preprocess([load_rgb(p, side) for p in abs_paths(test, ctx.inputs["data"])], card.preprocess)
    onnx_path = ctx.out / "model.onnx.tmp"
    info = _parity_export(ctx, model, card, x, onnx_path)
    info["decode_side"] = side  # the bundle decodes every image to this side (as the predict stage did)
    policy = TrustPolicy.load(ctx.inputs["policy"] / "policy.json")
    info["answers"] = _what_it_answers(ctx, policy)  # predict, serve and the card say it
    extra = _cascade_files(ctx, policy, info)
    extra["reference.json"] = _drift_reference(ctx, policy, ctx.out / "reference.json")
    if policy.cascade is not None:  # /v2 and Triton take tensors: the model alone, with its own certificate
        extra[MODEL_POLICY], info["model_policy"] = _model_alone_policy(ctx)
    variants: dict[str, tuple[Path | None, dict[str, Any]]] = {}
    if e.int8 != "none":
        q_path, info["int8"], extra["policy-int8.json"] = _int8_variant(ctx, card, policy, onnx_path, side)
        variants["int8"] = (q_path, info["int8"])
    if e.openvino:
        for name, (v_info, v_policy_path, v_path) in _openvino_variants(
            ctx, card, policy, onnx_path, info
        ).items():
            info[name], extra[v_policy_path.name] = v_info, v_policy_path
            variants[name] = (v_path, v_info)
    for _, v_info in variants.values():  # each variant's model-alone policy (/v2, Triton) ships with it
        if v_info.get("model_policy"):
            extra[v_info["model_policy"]] = ctx.out / v_info["model_policy"]
    # what roadwork bench may select: the fastest certified variant within these of fp32 on the test split
    info["selection"] = {"max_accuracy_drop": e.max_accuracy_drop, "max_ece_increase": e.max_ece_increase}
    info["size_mb"] = round(onnx_path.stat().st_size / 2**20, 3)
    write_bundle(
        ctx.out / "bundle",
        onnx_path=onnx_path,
        card=card,
        policy=policy,
        export_info=info,
        variants=variants,
        extra_files=extra,
    )
    if e.triton:
        from roadwork.export.variants import write_triton_repository

        repo = write_triton_repository(onnx_path, ctx.out / "triton", name=ctx.cfg.name)
        # Triton serves the model's logits: the policy a client applies is the one certified on them
        shutil.copyfile(extra.get(MODEL_POLICY, ctx.inputs["policy"] / "policy.json"), repo / "policy.json")
        info["triton"] = str(Path("export") / "triton" / ctx.cfg.name)
    _remove_staging_files(ctx, onnx_path, variants)
    return info


MODEL_POLICY = "policy-model.json"
"""The bundle's policy for the model alone (``/v2`` infer and Triton: tensors in, no cascade), with a cascade."""


def _model_alone_policy(ctx: StageContext) -> tuple[Path, dict[str, Any]]:
    """The policy certified on the model alone's outputs (every trust row of the calibration split, no gate):
    what ``/v2/.../infer`` and the Triton repository serve, since a cascade needs decoded images. Said in the
    log and recorded in the manifest (``export.model_policy``)."""
    from roadwork._progress import progress_write
    from roadwork.pipeline.certify import certify_served

    path = ctx.out / MODEL_POLICY
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RoadworkWarning)  # its warnings are recorded below
        policy, report = certify_served(ctx.cfg, _preds(ctx, "calib"), cascade=None)
    policy.save(path)
    a = policy.abstention
    note = (
        f"/v2 infer and the Triton repository serve the model alone (tensors in: the cascade needs decoded "
        f"images) with its own policy certified on its outputs ({MODEL_POLICY}: answers {a.coverage:.0%} of "
        f"{a.n} calibration rows at selective risk ≤ {a.target_risk:g}); /v1/classify serves the cascade"
    )
    progress_write(f"[export] {note}")
    return path, {"file": MODEL_POLICY, "served_by": ["/v2/models/{name}/infer", "triton"], "note": note} | {
        "certified_on": report["rows"],
        "warnings": report["warnings"],
    }


def _remove_staging_files(
    ctx: StageContext, onnx_path: Path, variants: dict[str, tuple[Path | None, dict[str, Any]]]
) -> None:
    """The bundle holds copies of everything: the stage folder keeps only the bundle (and Triton's repository)."""
    onnx_path.unlink()
    (ctx.out / "reference.json").unlink()
    (ctx.out / MODEL_POLICY).unlink(missing_ok=True)
    for path, v_info in variants.values():
        (ctx.out / v_info["policy"]).unlink(missing_ok=True)
        if v_info.get("model_policy"):
            (ctx.out / v_info["model_policy"]).unlink(missing_ok=True)
        if path is not None:
            path.unlink()
            path.with_suffix(".bin").unlink(missing_ok=True)  # an OpenVINO IR's weights


def _what_it_answers(ctx: StageContext, policy: TrustPolicy) -> dict[str, Any]:
    """The share of images the policy answers (not abstains on): on the test split (the served path on the stored
    outputs: the model's logits, the cascade's earlier stages), and on the calibration rows that certified it; with
    the smallest selective-risk target those rows could support (the advice when it answers nothing)."""
    from roadwork.trust.selective import smallest_certifiable_risk

    test = _preds(ctx, "test")
    if policy.cascade is not None:
        models = ctx.inputs["cascade_models"]
        outs = [*(stage_outputs(models, st, "test") for st in policy.cascade.stages[:-1]), test.logits]
        out = policy.apply_cascade(lambda s, r: outs[s][r], len(test), test.slices)
    else:
        out = policy.apply(test.logits, test.slices)
    cal, probs, _, _ = served_calib(ctx)
    a = policy.abstention
    pred, conf = policy.decision(probs)
    lowest, _ = smallest_certifiable_risk(
        conf,
        pred == cal.labels,
        a.delta,
        n_classes=cal.n_classes,
        method=a.method,  # type: ignore[arg-type]
    )
    return {
        "test": float((~out.abstain).mean()) if len(test) else None,
        "test_n": len(test),
        "calib": a.coverage,
        "calib_n": a.n,
        "target_risk": a.target_risk,
        "delta": a.delta,
        "smallest_certifiable_risk": lowest,
    }


def _drift_reference(ctx: StageContext, policy: TrustPolicy, path: Path) -> Path:
    """The policy rows of the calibration split through the served policy (the cascade too, when there is
    one): what ``roadwork monitor`` compares served traffic with."""
    from roadwork.monitor.drift import reference_table

    cal, _, cascade, early = served_calib(ctx)
    if cascade is not None:
        outs = [*early, cal.logits]
        out = policy.apply_cascade(lambda s, r: outs[s][r], len(cal), cal.slices)
    else:
        out = policy.apply(cal.logits, cal.slices)
    df = reference_table(out.probs, out.sets, out.abstain, cal.classes, cal.slices)
    if out.stage is not None and out.stage_names is not None:
        df["stage"] = [out.stage_names[s] for s in out.stage]
    write_json(path, {"schema": 1, "split": "calib", "rows": df.to_dict(orient="records")}, indent=None)
    return path


def _model_logits(path: Path, card: Any, paths: list[str], side: int, runtime: Any = None) -> np.ndarray:
    """``runtime``: a :class:`~roadwork.export.runtime.RuntimeSpec` (default: ONNX Runtime fp32)."""
    from roadwork.data.preprocess import load_rgb, preprocess
    from roadwork.export.onnx import onnx_logits
    from roadwork.export.runtime import RuntimeSpec, open_session

    session = open_session(path, runtime or RuntimeSpec()).session
    out = [
        onnx_logits(session, preprocess([load_rgb(p, side) for p in paths[i : i + 256]], card.preprocess))
        for i in range(0, len(paths), 256)
    ]
    return np.concatenate(out) if out else np.zeros((0, len(card.classes)))


def _variant_policy(
    ctx: StageContext, card: Any, policy: TrustPolicy, model_path: Path, runtime: Any = None
) -> tuple[TrustPolicy, dict[str, Any]]:
    """A model variant's own policy: its logits on the calibration split through the same chain the pipeline
    runs for the fp32 model (calibrator, the cascade's gate re-certified with this model last, thresholds)."""
    from roadwork.pipeline.certify import certify_served

    cal = _preds(ctx, "calib")
    df, _ = load_dataset(ctx.inputs["data"])
    part = df.set_index("id").loc[cal.ids].reset_index()
    logits = _model_logits(
        model_path,
        card,
        abs_paths(part, ctx.inputs["data"]),
        decode_side_for(ctx.cfg, card.preprocess),
        runtime,
    )
    variant = Predictions(cal.ids, cal.labels, logits, cal.classes, cal.slices)
    early = (
        []
        if policy.cascade is None
        else [stage_outputs(ctx.inputs["cascade_models"], st, "calib") for st in policy.cascade.stages[:-1]]
    )
    cascade = None
    if policy.cascade is not None:
        cascade = Cascade.from_dict(policy.cascade.to_dict())
    elif load_cascade(ctx.inputs["cascade"]) is not None:  # a cascade that kept the model alone: same rows
        cascade = load_cascade(ctx.inputs["cascade"])
    served, report = certify_served(ctx.cfg, variant, cascade=cascade, early=early)
    if served.cascade is not None:  # /v2 and Triton give this variant tensors: its model alone, certified too
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RoadworkWarning)
            report["model_alone"] = certify_served(ctx.cfg, variant, cascade=None)[0]
    return served, report


def _save_model_alone(ctx: StageContext, name: str, report: dict[str, Any], info: dict[str, Any]) -> None:
    """A variant's model-alone policy (see :func:`_variant_policy`) saved beside its policy, named in ``info``."""
    alone = report.pop("model_alone", None)
    if alone is not None:
        info["model_policy"] = f"policy-model-{name}.json"
        alone.save(ctx.out / info["model_policy"])


def _variant_quality(
    ctx: StageContext, card: Any, models: dict[str, tuple[Path, TrustPolicy]]
) -> dict[str, Any]:
    """Accuracy and ECE of each model file on the test split (the model alone, through its own policy's
    calibrator), and the change."""
    from roadwork.trust import metrics as M

    df, _ = load_dataset(ctx.inputs["data"])
    test = df[df["split"] == "test"]
    paths = abs_paths(test, ctx.inputs["data"])
    y = label_indices(test, card.classes)
    out: dict[str, Any] = {}
    for name, (path, pol) in models.items():
        probs = pol.apply(_model_logits(path, card, paths, decode_side_for(ctx.cfg, card.preprocess))).probs
        out[f"test_accuracy_{name}"] = M.accuracy(probs, y)
        out[f"test_ece_{name}"] = M.ece(probs, y)
    out["test_accuracy_change"] = out["test_accuracy_int8"] - out["test_accuracy_fp32"]
    out["test_ece_change"] = out["test_ece_int8"] - out["test_ece_fp32"]
    out["test_n"] = len(y)
    return out


# --------------------------------------------------------------------------------------------- evaluate


def _served_metrics(ctx: StageContext, test: Predictions, bundle: Any, out: Any) -> dict[str, Any]:
    """The test metrics of what is served (the bundle end to end), of the model alone, and the comparisons of
    calibration methods and conformal scores."""
    from roadwork.evaluation.metrics_table import (
        calibration_comparison,
        compute_metrics,
        conformal_comparison,
        model_alone_metrics,
    )

    bins = ctx.cfg.evaluate.ece_bins
    policy = bundle.policy
    metrics = compute_metrics(test, policy, out=out, n_bins=bins)
    metrics["served"] = {
        "what": "the exported bundle (fp32), run end to end on the test images",
        "path": " → ".join(policy.cascade.names) if policy.cascade is not None else "model",
        "stage_share": _stage_share(out, policy),
    }
    metrics["model_alone"] = model_alone_metrics(test, policy, n_bins=bins)
    metrics["calibration_comparison"] = calibration_comparison(_preds(ctx, "calib"), test, n_bins=bins)
    metrics["conformal_comparison"] = conformal_comparison(served_calib(ctx)[0], test, policy)
    return metrics


def _figures(
    ctx: StageContext, test: Predictions, out: Any, policy: TrustPolicy, path_of: dict[Any, str]
) -> dict[str, tuple[bytes, str]]:
    """The report's figures (PNG bytes and caption): reliability, risk–coverage, confusion, training curves,
    sample images and the most confident mistakes."""
    from roadwork.evaluation.plots import confusion_png, image_grid_png, reliability_png, risk_coverage_png

    bins = ctx.cfg.evaluate.ece_bins
    a = policy.abstention
    figures: dict[str, tuple[bytes, str]] = {
        "reliability": (
            reliability_png(softmax(test.logits), out.probs, test.labels, bins),
            "Reliability: top-label confidence vs accuracy on test, before and after calibration",
        ),
        "risk_coverage": (
            risk_coverage_png(
                out.confidence, out.pred == test.labels, target=a.target_risk, threshold=a.threshold
            ),
            "Risk–coverage: error on answered images as the model answers more of them",
        ),
        "confusion": (confusion_png(test.labels, out.pred, test.classes), "Confusion matrix: test split"),
    }
    train_png = ctx.inputs["train"] / "training.png"
    if train_png.is_file():
        figures["training"] = (
            train_png.read_bytes(),
            "Training curves: loss and validation accuracy per epoch",
        )

    def grid(rows: np.ndarray) -> bytes:  # caption: true label, then calibrated confidence and prediction
        c = test.classes
        caps = [f"true {c[test.labels[i]]}\np={out.confidence[i]:.2f} {c[out.pred[i]]}" for i in rows]
        return image_grid_png([path_of[test.ids[i]] for i in rows], caps)

    k = min(ctx.cfg.evaluate.n_examples, len(test))
    if k:
        pick = np.random.default_rng(0).choice(len(test), size=k, replace=False)
        figures["samples"] = (
            grid(pick),
            "Sample test images: true label, calibrated confidence and prediction",
        )
        wrong = np.flatnonzero(out.pred != test.labels)
        worst = wrong[np.argsort(-out.confidence[wrong])][:k]
        if len(worst):
            figures["mistakes"] = (
                grid(worst),
                "Worst mistakes: the most confident wrong predictions on test",
            )
    return figures


def _timing(ctx: StageContext, evaluate_seconds: float) -> dict[str, float]:
    """Seconds each stage took (from its manifest), this one included."""
    manifests = {name: stage_manifest(p) for name, p in ctx.inputs.items()}
    timing = {name: m["seconds"] for name, m in manifests.items() if m is not None}
    return timing | {"evaluate": evaluate_seconds}


def _cascade_report(ctx: StageContext, policy: TrustPolicy, test: Predictions, out: Any) -> dict[str, Any]:
    """The served cascade's figures on test: per stage, the frontier, and the candidates the gate chose from."""
    from roadwork.evaluation.cascade import cascade_metrics

    assert policy.cascade is not None
    models = ctx.inputs["cascade_models"]
    stage_logits = [stage_outputs(models, st, "test") for st in policy.cascade.stages[:-1]]
    curves = read_json(ctx.inputs["cascade"] / "curves.json")
    section, _ = cascade_metrics(policy, [*stage_logits, test.logits], test, curves, served=out)
    section["candidates"] = read_json(ctx.inputs["cascade"] / "cascade.json").get("candidates", [])
    return section


def _write_reports(ctx: StageContext, metrics: dict[str, Any], figures: dict[str, tuple[bytes, str]]) -> None:
    """metrics.json, slices.csv, the figures, report.html and MODEL_CARD.md."""
    from roadwork.evaluation.report import render_html, render_model_card

    cfg = ctx.cfg
    fig_dir = ctx.out / "figures"
    fig_dir.mkdir()
    for name, (png, _) in figures.items():
        (fig_dir / f"{name}.png").write_bytes(png)
    write_json(ctx.out / "metrics.json", metrics)
    slices = pd.DataFrame([{"slice": k, **v} for k, v in metrics["slices"].items()])
    slices.to_csv(ctx.out / "slices.csv", index=False)
    html = render_html(
        metrics=metrics,
        figures=figures,
        data_report=read_json(ctx.inputs["data"] / "data_report.json"),
        config_yaml=dump_config(cfg),
        run_name=cfg.name,
    )
    (ctx.out / "report.html").write_text(html)
    card = render_model_card(
        metrics=metrics, run_name=cfg.name, backbone=cfg.model.backbone, data_source=cfg.data.source
    )
    (ctx.out / "MODEL_CARD.md").write_text(card)


def stage_evaluate(ctx: StageContext) -> dict[str, Any]:
    """The exported bundle, end to end (ONNX Runtime, cascade, policy), on the test images: metrics.json, the
    figures, report.html and MODEL_CARD.md."""
    from roadwork.export.bundle import Bundle

    t0 = time.perf_counter()
    test = _preds(ctx, "test")
    bundle = Bundle.load(ctx.inputs["export"] / "bundle")  # the artefact users run
    df, _ = load_dataset(ctx.inputs["data"])
    path_of = dict(zip(df["id"], abs_paths(df, ctx.inputs["data"]), strict=True))
    out = bundle.predict_output([path_of[i] for i in test.ids], slices=test.slices or None)
    metrics = _served_metrics(ctx, test, bundle, out)
    if (
        bundle.policy.slice_columns and test.slices
    ):  # slice-dependent policy: requests without metadata differ
        from roadwork.evaluation.metrics_table import request_kind_figures

        bare = bundle.predict_output([path_of[i] for i in test.ids], slices=None)
        metrics["request_kinds"] = {
            "slice_columns": bundle.policy.slice_columns,
            "with_metadata": request_kind_figures(out, test.labels),
            "bare": request_kind_figures(bare, test.labels),
        }
    figures = _figures(ctx, test, out, bundle.policy, path_of)
    metrics["timing"] = _timing(ctx, time.perf_counter() - t0)
    if bundle.policy.cascade is not None:
        metrics["cascade"] = _cascade_report(ctx, bundle.policy, test, out)
    metrics["model_check"] = _model_check(ctx, test, df, path_of)
    audit, section = _label_audit(ctx)
    metrics["label_audit"] = audit
    metrics["warnings"] = list(
        dict.fromkeys(metrics["model_check"]["warnings"] + _run_warnings(ctx) + audit.get("warnings", []))
    )
    metrics["export"] = read_json(ctx.inputs["export"] / "bundle" / "manifest.json")["export"]
    _write_reports(ctx, metrics, figures)
    if section:
        from roadwork.evaluation.report import with_section

        report = ctx.out / "report.html"
        report.write_text(with_section(report.read_text(), "label-audit", section))
    return {"accuracy": metrics["test"]["accuracy"]}


def _label_audit(ctx: StageContext) -> tuple[dict[str, Any], str]:
    """``evaluate.label_audit``: the label audit of the calibration and test splits (label_issues.csv,
    label_audit.json, the report section); its summary for metrics.json, with a warning when the estimated flip
    rate is material. Skipped (and said so) without cleanlab."""
    e = ctx.cfg.evaluate
    if not e.label_audit:
        return {"ran": False, "why": "evaluate.label_audit=false"}, ""
    import importlib.util

    if importlib.util.find_spec("cleanlab") is None:
        return {"ran": False, "why": "cleanlab is not installed (pip install -e '.[field]')"}, ""
    from roadwork.field.audit import MATERIAL_FLIP_RATE, write_audit
    from roadwork.pipeline.audit import audit_inputs

    inputs = audit_inputs(ctx.inputs["data"], ctx.inputs["predict"], ctx.inputs["calibrate"])
    try:
        result, section = write_audit(
            ctx.out, *inputs, top=e.audit_top, csv_name="label_issues.csv", json_name="label_audit.json"
        )
    except (
        Exception
    ) as err:  # an audit that cannot run (a class absent from both splits) does not stop the report
        return {"ran": False, "why": f"{type(err).__name__}: {err}"[:300]}, ""
    summary = {k: result[k] for k in ("n", "flip_rate", "flip_rate_per_class", "suggested_label_flip_rate")}
    summary |= {"ran": True, "n_issues": len(result["issues"])}
    if result["suggested_label_flip_rate"] is not None:
        summary["warnings"] = [
            f"The label audit flags {100 * result['flip_rate']:.1f} % of the calibration and test labels as likely "
            f"wrong (over {100 * MATERIAL_FLIP_RATE:.0f} %); the conformal guarantee assumes clean calibration "
            "labels. Check evaluate/label_issues.csv (hard images also look like flips), fix the labels, or rerun "
            f"with conformal.label_flip_rate={result['suggested_label_flip_rate']}."
        ]
    return summary, section


_BASELINE_TRAIN_IMAGES = 5000  # the feature baseline's training rows at most (a sample: it is a reference)


def _model_check(
    ctx: StageContext, test: Predictions, df: pd.DataFrame, path_of: dict[Any, str]
) -> dict[str, Any]:
    """Is the model better than chance, and near what a cheap baseline gets from the same training images? (see
    :mod:`roadwork.evaluation.quality`)."""
    from roadwork.data.features import FEATURE_SPEC
    from roadwork.data.preprocess import load_rgb
    from roadwork.errors import MissingDependencyError
    from roadwork.evaluation.quality import feature_baseline, model_check

    history_file = ctx.inputs["train"] / "history.json"
    history = json.loads(history_file.read_text()) if history_file.is_file() else []
    train = split_rows(df, "train")
    if len(train) > _BASELINE_TRAIN_IMAGES:
        train = train.sample(_BASELINE_TRAIN_IMAGES, random_state=0)
    side = 2 * FEATURE_SPEC.size  # the features see 32 px: decode small (JPEG DCT scaling)
    try:
        correct = feature_baseline(
            [load_rgb(p, side) for p in abs_paths(train, ctx.inputs["data"])],
            label_indices(train, test.classes),
            [load_rgb(path_of[i], side) for i in test.ids],
            test.labels,
            seed=ctx.cfg.train.seed,
        )
    except MissingDependencyError:  # scikit-learn absent: the chance checks still run
        correct = None
    from roadwork.config import load_config

    m, recipe = ctx.cfg.model, load_config("scratch").model
    return model_check(
        test.logits,
        test.labels,
        test.classes,
        val_losses=[float(h["val_loss"]) for h in history],
        baseline_correct=correct,
        pretrained=m.pretrained or m.weights is not None,
        scratch=(m.backbone, m.kwargs) == (recipe.backbone, recipe.kwargs),
    )


def _stage_share(out: Any, policy: TrustPolicy) -> dict[str, float]:
    if out.stage is None or policy.cascade is None:
        return {"model": 1.0}
    share = np.bincount(out.stage, minlength=len(policy.cascade.stages)) / max(len(out.stage), 1)
    return {name: float(x) for name, x in zip(policy.cascade.names, share, strict=True)}


def _run_warnings(ctx: StageContext) -> list[str]:
    """Every degenerate-outcome warning the trust stages recorded, in stage order, once each."""
    found: list[str] = []
    for name in ("calibrate", "cascade", "conformal", "selective", "policy"):
        manifest = stage_manifest(ctx.inputs[name])
        if manifest is not None:
            found += manifest.get("info", {}).get("warnings", []) or []
    return list(dict.fromkeys(found))


def _code(*packages: str) -> tuple[str, ...]:
    """The source a stage runs: its packages, plus this file and the run config (edited → the stage reruns)."""
    return (*packages, "pipeline/stages.py", "pipeline/artifacts.py", "config.py")


STAGES: list[Stage] = [
    Stage("data", (), ("data",), stage_data, fingerprint=_source_fingerprint, code=_code("data")),
    Stage("train", ("data",), ("model", "train"), stage_train, code=_code("data", "models", "training")),
    Stage("predict", ("data", "train"), (), stage_predict, code=_code("data", "models", "training", "trust")),
    Stage(
        "calibrate", ("predict",), ("calibrate",), stage_calibrate, code=_code("trust", "pipeline/certify.py")
    ),
    Stage(
        "cascade_models",
        ("data", "train", "predict", "calibrate"),
        (
            "cascade.enabled",
            "cascade.boosting",
            "cascade.boosting_rounds",
            "cascade.boosting_depth",
            "cascade.small",
            "cascade.cost_batch",
            "cascade.cost_images",
            "train",
            "export.opset",
        ),
        stage_cascade_models,
        fingerprint=cascade_auto_key,  # cascade.enabled=auto decides here from cascade.target and the data
        code=_code("data", "models", "training", "export", "trust", "pipeline/cascade_stages.py"),
    ),
    Stage(
        "cascade",
        ("predict", "calibrate", "cascade_models"),
        ("cascade", "calibrate"),
        stage_cascade,
        code=_code("trust", "pipeline/cascade_stages.py", "pipeline/certify.py"),
    ),
    # the policy's thresholds are certified on the served path's outputs: after the cascade, on other rows
    Stage(
        "conformal",
        ("predict", "calibrate", "cascade_models", "cascade"),
        ("conformal", "calibrate", "cascade.gate_fraction"),
        stage_conformal,
        code=_code("trust", "pipeline/certify.py", "pipeline/cascade_stages.py"),
    ),
    Stage(
        "selective",
        ("predict", "calibrate", "cascade_models", "cascade"),
        ("selective", "calibrate", "policy", "cascade.gate_fraction"),  # policy: the decision certified
        stage_selective,
        code=_code("trust", "pipeline/certify.py", "pipeline/cascade_stages.py"),
    ),
    Stage(
        "policy",
        ("predict", "calibrate", "conformal", "selective", "cascade_models", "cascade"),
        ("policy", "calibrate", "cascade.gate_fraction"),
        stage_policy,
        code=_code("trust", "pipeline/certify.py", "pipeline/cascade_stages.py"),
    ),
    Stage(
        "export",
        ("data", "train", "predict", "calibrate", "policy", "cascade", "cascade_models"),
        ("export", "calibrate", "conformal", "selective", "policy", "cascade.gate_fraction"),
        stage_export,
        code=_code("data", "models", "export", "trust", "pipeline/certify.py"),
    ),
    Stage(
        "evaluate",
        (
            "data",
            "train",
            "predict",
            "calibrate",
            "conformal",
            "selective",
            "policy",
            "cascade_models",
            "cascade",
            "export",
        ),
        ("evaluate",),
        stage_evaluate,
        code=_code("data", "evaluation", "trust", "export", "field/audit.py", "pipeline/audit.py"),
    ),
]
"""The stage graph the runner walks: each stage's inputs, the config keys and source its cache key covers."""
