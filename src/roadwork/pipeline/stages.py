"""The stage functions of the main job and their graph.

    data → train → predict → calibrate → conformal, selective → policy → cascade_models → cascade → export
    → evaluate   (the cascade's two stages live in :mod:`roadwork.pipeline.cascade_stages`)

Each function reads its inputs' folders and writes into ``ctx.out``; see :mod:`roadwork.pipeline.runner`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from roadwork.config import RunConfig, dump_config
from roadwork.errors import ConfigError
from roadwork.pipeline.runner import Stage, StageContext
from roadwork.trust import (
    Predictions,
    SplitConformal,
    TrustPolicy,
    certify_abstention,
    make_calibrator,
)
from roadwork.trust.calibration import Calibrator, SliceCalibrator, calibrate_proba, calibrator_from_dict
from roadwork.trust.selective import AbstentionCertificate

__all__ = ["STAGES", "load_dataset", "load_policy"]

SPLITS_PREDICTED = ("val", "calib", "test")


def load_dataset(data_dir: Path) -> tuple[pd.DataFrame, list[str]]:
    df = pd.read_parquet(data_dir / "dataset.parquet")
    report = json.loads((data_dir / "data_report.json").read_text())
    return df, list(report["classes"])


def load_policy(run_dir: Path) -> TrustPolicy:
    return TrustPolicy.load(run_dir / "policy" / "policy.json")


def _labels(df: pd.DataFrame, classes: list[str]) -> np.ndarray:
    index = {c: i for i, c in enumerate(classes)}
    return df["label"].map(index).to_numpy(dtype=np.int64)


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
    h = hashlib.sha256(str(src.resolve()).encode())
    if src.is_dir():
        files = sorted(p for p in src.rglob("*") if p.is_file())
    elif src.is_file():
        files = [src]
    else:
        return "missing"
    for p in files:
        st = p.stat()
        h.update(f"{p.relative_to(src) if src.is_dir() else p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def stage_data(ctx: StageContext) -> dict[str, Any]:
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


def _abs_paths(df: pd.DataFrame, data_dir: Path) -> list[str]:
    return [p if Path(p).is_absolute() else str(data_dir / p) for p in df["path"]]


# --------------------------------------------------------------------------------------------- train


def _explora(ctx: StageContext) -> Path:
    """ExPLoRA step (a) on ``train.unlabeled``; the backbone it returns starts the supervised training."""
    from roadwork._deps import require
    from roadwork.data.preprocess import PreprocessSpec
    from roadwork.scale.batch import list_images
    from roadwork.training.explora import explora_pretrain
    from roadwork.training.loop import load_uint8

    t = ctx.cfg.train
    if not t.unlabeled or not Path(t.unlabeled).exists():
        raise ConfigError(
            f"train.recipe=explora needs train.unlabeled=FOLDER of unlabelled target-domain images; got {t.unlabeled!r}."
        )
    paths = list_images([t.unlabeled])["path"].tolist()
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
    from roadwork.evaluation.plots import training_png
    from roadwork.models.factory import save_model
    from roadwork.training.loop import save_history, train_model

    df, classes = load_dataset(ctx.inputs["data"])
    tr, va = df[df["split"] == "train"], df[df["split"] == "val"]

    def on_epoch(epoch: int, row: dict[str, float]) -> None:
        if ctx.tracker is not None:
            ctx.tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
        if ctx.on_epoch is not None:
            ctx.on_epoch(epoch, row)

    # one folder per data version: a checkpoint of other data is never resumed (the config is checked too)
    checkpoints = ctx.cfg.run_dir / "checkpoints" / f"train-{_dir_digest(ctx.inputs['data'])[:12]}"
    init_backbone = _explora(ctx) if ctx.cfg.train.recipe == "explora" else None
    res = train_model(
        ctx.cfg.model,
        ctx.cfg.train,
        classes=classes,
        train_paths=_abs_paths(tr, ctx.inputs["data"]),
        train_labels=_labels(tr, classes),
        val_paths=_abs_paths(va, ctx.inputs["data"]),
        val_labels=_labels(va, classes),
        on_epoch=on_epoch,
        progress=ctx.progress,
        checkpoint_dir=checkpoints,  # outside the stage's temp folder, so an interrupted run resumes
        init_backbone=init_backbone,
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
    from roadwork.models.factory import load_model
    from roadwork.training.loop import load_uint8, predict_logits

    df, classes = load_dataset(ctx.inputs["data"])
    model, card = load_model(ctx.inputs["train"])
    slice_cols = [c for c in df.columns if c not in ("id", "path", "label", "split", "sha256")]
    counts = {}
    for split in SPLITS_PREDICTED:
        part = df[df["split"] == split]
        u8 = load_uint8(
            _abs_paths(part, ctx.inputs["data"]), card.preprocess, f"reading {split}", ctx.progress
        )
        logits = predict_logits(model, u8, card.preprocess)
        Predictions(
            part["id"].to_numpy(),
            _labels(part, classes),
            logits.reshape(len(part), len(classes)),
            classes,
            {c: part[c].to_numpy() for c in slice_cols},
        ).to_parquet(ctx.out / f"predictions-{split}.parquet")
        counts[split] = len(part)
    return counts


def _preds(ctx: StageContext, split: str) -> Predictions:
    return Predictions.from_parquet(ctx.inputs["predict"] / f"predictions-{split}.parquet")


# --------------------------------------------------------------------------------------------- trust


def _slice_column(p: Predictions, column: str, key: str) -> np.ndarray:
    if column not in p.slices:
        raise ConfigError(
            f"{key}={column!r} is not a slice column of this dataset; it has "
            f"{', '.join(sorted(p.slices)) or 'none'}. Set {key} to one of those (or null)."
        )
    return p.slices[column]


def _calibrator_rows(ids: np.ndarray, fraction: float) -> np.ndarray:
    """Rows of the calibration split the calibrator is fitted on: a stable hash of the id below ``fraction``
    (all rows at 1.0). The other rows fit the conformal threshold, abstention and risk control."""
    if fraction >= 1:
        return np.ones(len(ids), dtype=bool)
    u = np.array([int(hashlib.sha256(f"calibrator:{i}".encode()).hexdigest()[:15], 16) for i in ids]) / 16**15
    return u < fraction


def _fit_fraction(cfg: RunConfig) -> float:
    c = cfg.calibrate
    if c.fit_fraction is not None:
        return c.fit_fraction
    shared = c.method in ("none", "temperature") and not c.per_slice  # ≤ 1 parameter: share all rows
    return 1.0 if shared else 0.3


def stage_calibrate(ctx: StageContext) -> dict[str, Any]:
    cal = _preds(ctx, "calib")
    c = ctx.cfg.calibrate
    fraction = _fit_fraction(ctx.cfg)
    rows = _calibrator_rows(cal.ids, fraction)
    if fraction < 1 and (rows.sum() < 20 or (~rows).sum() < 20):
        raise ConfigError(
            f"calibrate.fit_fraction={fraction:g} leaves {int(rows.sum())} calibration rows for the calibrator "
            f"and {int((~rows).sum())} for the conformal threshold; each needs at least 20. Use more data or "
            "calibrate.fit_fraction=1 (share all rows)."
        )
    fit = cal.subset(rows)
    calibrator: Calibrator
    if c.per_slice:
        groups = _slice_column(fit, c.per_slice, "calibrate.per_slice")
        calibrator = SliceCalibrator(c.method, c.per_slice, min_count=c.min_slice_count).fit(
            fit.logits, fit.labels, groups
        )
    else:
        calibrator = make_calibrator(c.method).fit(fit.logits, fit.labels)
    (ctx.out / "calibrator.json").write_text(json.dumps(calibrator.to_dict(), indent=2))
    split = {
        "fit_fraction": fraction,
        "n_calibrator": int(rows.sum()),
        "n_trust": int((~rows).sum() or len(cal)),
    }
    (ctx.out / "split.json").write_text(json.dumps(split, indent=2))
    return {**calibrator.to_dict(), "rows": split}


def _trust_calib(ctx: StageContext) -> Predictions:
    """The calibration rows that fit conformal, abstention and risk control (disjoint from the calibrator's
    rows unless the calibrator shares them, ``fit_fraction`` 1)."""
    cal = _preds(ctx, "calib")
    fraction = json.loads((ctx.inputs["calibrate"] / "split.json").read_text())["fit_fraction"]
    return cal if fraction >= 1 else cal.subset(~_calibrator_rows(cal.ids, fraction))


def _calibrated_calib(ctx: StageContext) -> tuple[Predictions, np.ndarray]:
    cal = _trust_calib(ctx)
    calibrator = calibrator_from_dict(json.loads((ctx.inputs["calibrate"] / "calibrator.json").read_text()))
    return cal, calibrate_proba(calibrator, cal.logits, cal.slices)


def stage_conformal(ctx: StageContext) -> dict[str, Any]:
    cal, probs = _calibrated_calib(ctx)
    c = ctx.cfg.conformal
    conf = SplitConformal(
        alpha=c.alpha,
        score=c.method,
        randomized=c.randomized,
        mondrian=None if c.mondrian == "none" else c.mondrian,
        allow_empty=c.allow_empty,
        label_noise=c.label_noise,
        group_by=c.group_by,
    ).fit(probs, cal.labels, _slice_column(cal, c.group_by, "conformal.group_by") if c.group_by else None)
    (ctx.out / "conformal.json").write_text(json.dumps(conf.to_dict(), indent=2))
    return conf.to_dict()


def stage_selective(ctx: StageContext) -> dict[str, Any]:
    cal, probs = _calibrated_calib(ctx)
    s = ctx.cfg.selective
    cert = certify_abstention(
        probs.max(axis=1),
        probs.argmax(axis=1) == cal.labels,
        target_risk=s.target_risk,
        delta=s.delta,
        n_classes=cal.n_classes,
        method=s.method,
    )
    (ctx.out / "selective.json").write_text(json.dumps(cert.to_dict(), indent=2))
    return cert.to_dict()


def stage_policy(ctx: StageContext) -> dict[str, Any]:
    from roadwork.trust.operating import fit_operating_point
    from roadwork.trust.risk import FalseNegativeControl

    cal, probs = _calibrated_calib(ctx)
    classes = cal.classes
    positive = (
        "roadwork" if classes == ["no_roadwork", "roadwork"] else (classes[1] if len(classes) == 2 else None)
    )
    op, fnr = None, None
    pc = ctx.cfg.policy
    if positive is None and (pc.operating_point != "none" or pc.max_miss_rate is not None):
        raise ConfigError(
            f"policy.operating_point and policy.max_miss_rate need two classes; this task has {len(classes)}. "
            "Set policy.operating_point=none and policy.max_miss_rate=null."
        )
    if positive is not None and pc.max_miss_rate is not None:
        fnr = FalseNegativeControl(alpha=pc.max_miss_rate, positive=classes.index(positive)).fit(
            probs, cal.labels
        )
    if pc.operating_point != "none":
        assert positive is not None
        k = classes.index(positive)
        op = fit_operating_point(
            probs[:, k],
            cal.labels == k,
            criterion=pc.operating_point,
            target=pc.target,
        )
    policy = TrustPolicy(
        classes=classes,
        calibrator=calibrator_from_dict(
            json.loads((ctx.inputs["calibrate"] / "calibrator.json").read_text())
        ),
        conformal=SplitConformal.from_dict(
            json.loads((ctx.inputs["conformal"] / "conformal.json").read_text())
        ),
        abstention=AbstentionCertificate.from_dict(
            json.loads((ctx.inputs["selective"] / "selective.json").read_text())
        ),
        positive_class=positive,
        operating_point=op,
        risk_control=fnr,
    )
    policy.save(ctx.out / "policy.json")
    return {
        "classes": classes,
        "positive_class": positive,
        "operating_point": op and op.to_dict(),
        "risk_control": fnr and fnr.to_dict(),
    }


# --------------------------------------------------------------------------------------------- export


def stage_export(ctx: StageContext) -> dict[str, Any]:
    from roadwork._deps import require
    from roadwork.data.preprocess import load_rgb, preprocess
    from roadwork.errors import ArtifactError
    from roadwork.export.bundle import write_bundle
    from roadwork.export.onnx import export_onnx, onnx_logits, onnx_session
    from roadwork.models.factory import load_model

    e = ctx.cfg.export
    model, card = load_model(ctx.inputs["train"])
    df, _ = load_dataset(ctx.inputs["data"])
    test = df[df["split"] == "test"].head(e.parity_samples)
    x = preprocess([load_rgb(p) for p in _abs_paths(test, ctx.inputs["data"])], card.preprocess)
    onnx_path = ctx.out / "model.onnx.tmp"
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
    info: dict[str, Any] = {
        "exporter": exporter,
        "opset": e.opset,
        "parity_max_abs_diff": max_diff,
        "parity_n": len(x),
    }
    if e.tensorrt:
        from roadwork.export.variants import tensorrt_available

        if not tensorrt_available():
            raise ConfigError(
                "export.tensorrt=true needs an NVIDIA GPU and ONNX Runtime's TensorRT execution provider "
                "(pip install onnxruntime-gpu tensorrt); this machine has neither. Set export.tensorrt=false."
            )
    policy = TrustPolicy.load(ctx.inputs["policy"] / "policy.json")
    extra: dict[str, Path] = {}
    spec = json.loads((ctx.inputs["cascade"] / "cascade.json").read_text())
    if spec.get("enabled"):
        from roadwork.trust.cascade import Cascade

        policy.cascade = Cascade.from_dict(spec)
        for st in policy.cascade.stages[:-1]:
            for name in (st.file, st.info.get("card")):
                if name:
                    extra[name] = ctx.inputs["cascade_models"] / name
        info["cascade"] = {"stages": policy.cascade.names, "threshold": policy.cascade.threshold}
    extra["reference.json"] = _drift_reference(ctx, policy, ctx.out / "reference.json")
    variants: dict[str, tuple[Path, dict[str, Any]]] = {}
    if e.int8 != "none":
        from roadwork.export.variants import quantize_int8

        train_rows = df[df["split"] == "train"].head(e.int8_calibration_images)
        calib_x = (
            preprocess([load_rgb(p) for p in _abs_paths(train_rows, ctx.inputs["data"])], card.preprocess)
            if e.int8 == "static"
            else None
        )
        q_path = ctx.out / "model-int8.onnx.tmp"
        q_info = quantize_int8(onnx_path, q_path, mode=e.int8, calibration=calib_x)
        info["int8"] = q_info | _variant_quality(ctx, card, policy, {"fp32": onnx_path, "int8": q_path})
        info["int8"]["size_mb"] = round(q_path.stat().st_size / 2**20, 3)
        variants["int8"] = (q_path, info["int8"])
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

        write_triton_repository(onnx_path, ctx.out / "triton", name=ctx.cfg.name)
        info["triton"] = str(Path("export") / "triton" / ctx.cfg.name)
    onnx_path.unlink()
    (ctx.out / "reference.json").unlink()
    for path, _ in variants.values():
        path.unlink()
    return info


def _drift_reference(ctx: StageContext, policy: TrustPolicy, path: Path) -> Path:
    """The calibration split through the served policy (the cascade too, when there is one): what
    ``roadwork monitor`` compares served traffic with."""
    from roadwork.monitor.drift import reference_table

    cal = _trust_calib(ctx)
    if policy.cascade is not None:
        from roadwork.pipeline.cascade_stages import stage_outputs

        full = _preds(ctx, "calib")
        rows = np.flatnonzero(np.isin(full.ids, cal.ids))
        outs = [
            stage_outputs(ctx.inputs["cascade_models"], st, "calib")[rows]
            for st in policy.cascade.stages[:-1]
        ]
        out = policy.apply_cascade(
            lambda s, r: outs[s][r] if s < len(outs) else cal.logits[r], len(cal), cal.slices
        )
    else:
        out = policy.apply(cal.logits, cal.slices)
    df = reference_table(out.probs, out.sets, out.abstain, cal.classes, cal.slices)
    if out.stage is not None and out.stage_names is not None:
        df["stage"] = [out.stage_names[s] for s in out.stage]
    path.write_text(json.dumps({"schema": 1, "split": "calib", "rows": df.to_dict(orient="records")}))
    return path


def _variant_quality(
    ctx: StageContext, card: Any, policy: TrustPolicy, models: dict[str, Path]
) -> dict[str, Any]:
    """Accuracy and ECE of each model file on the test split (through the same policy), and the change."""
    from roadwork.data.preprocess import load_rgb, preprocess
    from roadwork.export.onnx import onnx_logits, onnx_session
    from roadwork.trust import metrics as M

    df, _ = load_dataset(ctx.inputs["data"])
    test = df[df["split"] == "test"]
    x = preprocess([load_rgb(p) for p in _abs_paths(test, ctx.inputs["data"])], card.preprocess)
    y = _labels(test, card.classes)
    out: dict[str, Any] = {}
    for name, path in models.items():
        probs = policy.apply(onnx_logits(onnx_session(path), x)).probs
        out[f"test_accuracy_{name}"] = M.accuracy(probs, y)
        out[f"test_ece_{name}"] = M.ece(probs, y)
    out["test_accuracy_change"] = out["test_accuracy_int8"] - out["test_accuracy_fp32"]
    out["test_ece_change"] = out["test_ece_int8"] - out["test_ece_fp32"]
    out["test_n"] = len(y)
    return out


# --------------------------------------------------------------------------------------------- evaluate


def stage_evaluate(ctx: StageContext) -> dict[str, Any]:
    from roadwork.evaluation.metrics_table import (
        calibration_comparison,
        compute_metrics,
        conformal_comparison,
    )
    from roadwork.evaluation.plots import confusion_png, image_grid_png, reliability_png, risk_coverage_png
    from roadwork.evaluation.report import render_html, render_model_card
    from roadwork.trust._checks import softmax

    t0 = time.perf_counter()
    cfg = ctx.cfg
    test = _preds(ctx, "test")
    policy = TrustPolicy.load(ctx.inputs["policy"] / "policy.json")
    metrics = compute_metrics(test, policy, n_bins=cfg.evaluate.ece_bins)
    metrics["calibration_comparison"] = calibration_comparison(
        _preds(ctx, "calib"), test, n_bins=cfg.evaluate.ece_bins
    )
    metrics["conformal_comparison"] = conformal_comparison(_trust_calib(ctx), test, policy)
    out = policy.apply(test.logits, test.slices)
    df, _ = load_dataset(ctx.inputs["data"])
    path_of = dict(zip(df["id"], _abs_paths(df, ctx.inputs["data"]), strict=True))

    figures: dict[str, tuple[bytes, str]] = {
        "reliability": (
            reliability_png(softmax(test.logits), out.probs, test.labels, cfg.evaluate.ece_bins),
            "Reliability: top-label confidence vs accuracy on test, before and after calibration",
        ),
        "risk_coverage": (
            risk_coverage_png(
                out.confidence,
                out.pred == test.labels,
                target=policy.abstention.target_risk,
                threshold=policy.abstention.threshold,
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
        caps = [
            f"true {test.classes[test.labels[i]]}\np={out.confidence[i]:.2f} {test.classes[out.pred[i]]}"
            for i in rows
        ]
        return image_grid_png([path_of[test.ids[i]] for i in rows], caps)

    k = min(cfg.evaluate.n_examples, len(test))
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
    fig_dir = ctx.out / "figures"
    fig_dir.mkdir()
    for name, (png, _) in figures.items():
        (fig_dir / f"{name}.png").write_bytes(png)

    timing = {
        name: json.loads((p / "manifest.json").read_text())["seconds"]
        for name, p in ctx.inputs.items()
        if (p / "manifest.json").is_file()
    }
    timing["evaluate"] = time.perf_counter() - t0
    metrics["timing"] = timing
    spec = json.loads((ctx.inputs["cascade"] / "cascade.json").read_text())
    if spec.get("enabled"):
        from roadwork.evaluation.cascade import cascade_metrics
        from roadwork.pipeline.cascade_stages import stage_outputs
        from roadwork.trust.cascade import Cascade

        cpolicy = TrustPolicy.load(ctx.inputs["policy"] / "policy.json")
        cpolicy.cascade = Cascade.from_dict(spec)
        stage_logits = [
            stage_outputs(ctx.inputs["cascade_models"], st, "test") for st in cpolicy.cascade.stages[:-1]
        ]
        curves = json.loads((ctx.inputs["cascade"] / "curves.json").read_text())
        metrics["cascade"], _ = cascade_metrics(cpolicy, [*stage_logits, test.logits], test, curves)
        metrics["cascade"]["candidates"] = spec.get("candidates", [])
    bundle_manifest = json.loads((ctx.inputs["export"] / "bundle" / "manifest.json").read_text())
    metrics["export"] = bundle_manifest["export"]
    (ctx.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    pd.DataFrame([{"slice": k, **v} for k, v in metrics["slices"].items()]).to_csv(
        ctx.out / "slices.csv", index=False
    )
    data_report = json.loads((ctx.inputs["data"] / "data_report.json").read_text())
    (ctx.out / "report.html").write_text(
        render_html(
            metrics=metrics,
            figures=figures,
            data_report=data_report,
            config_yaml=dump_config(cfg),
            run_name=cfg.name,
        )
    )
    (ctx.out / "MODEL_CARD.md").write_text(
        render_model_card(
            metrics=metrics, run_name=cfg.name, backbone=cfg.model.backbone, data_source=cfg.data.source
        )
    )
    return {"accuracy": metrics["test"]["accuracy"]}


def _cascade_models(ctx: StageContext) -> dict[str, Any]:
    from roadwork.pipeline.cascade_stages import stage_cascade_models

    return stage_cascade_models(ctx)


def _cascade(ctx: StageContext) -> dict[str, Any]:
    from roadwork.pipeline.cascade_stages import stage_cascade

    return stage_cascade(ctx)


def _code(*packages: str) -> tuple[str, ...]:
    """The source a stage runs: its packages, plus this file and the run config (edited → the stage reruns)."""
    return (*packages, "pipeline/stages.py", "config.py")


STAGES: list[Stage] = [
    Stage("data", (), ("data",), stage_data, fingerprint=_source_fingerprint, code=_code("data")),
    Stage("train", ("data",), ("model", "train"), stage_train, code=_code("data", "models", "training")),
    Stage("predict", ("data", "train"), (), stage_predict, code=_code("data", "models", "training", "trust")),
    Stage("calibrate", ("predict",), ("calibrate",), stage_calibrate, code=_code("trust")),
    Stage("conformal", ("predict", "calibrate"), ("conformal",), stage_conformal, code=_code("trust")),
    Stage("selective", ("predict", "calibrate"), ("selective",), stage_selective, code=_code("trust")),
    Stage(
        "policy",
        ("predict", "calibrate", "conformal", "selective"),
        ("policy",),
        stage_policy,
        code=_code("trust"),
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
        _cascade_models,
        code=_code("data", "models", "training", "export", "trust", "pipeline/cascade_stages.py"),
    ),
    Stage(
        "cascade",
        ("predict", "calibrate", "policy", "cascade_models"),
        ("cascade", "calibrate"),
        _cascade,
        code=_code("trust", "pipeline/cascade_stages.py"),
    ),
    Stage(
        "export",
        ("data", "train", "predict", "calibrate", "policy", "cascade", "cascade_models"),
        ("export",),
        stage_export,
        code=_code("data", "models", "export", "trust"),
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
        code=_code("data", "evaluation", "trust"),
    ),
]
