"""``roadwork <command> key=value ...`` — one entry point for the whole job."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from roadwork.errors import RoadworkError

HELP = """\
roadwork — labelled images in; a calibrated, conformal, certified, deployable classifier out.

Usage:
  roadwork demo [key=value ...] [--force STAGE]     the whole job on generated roadwork scenes
  roadwork run [CONFIG] [key=value ...] [--force STAGE] [--until STAGE]
  roadwork STAGE [CONFIG] [key=value ...]           run up to one stage (data, train, calibrate, conformal,
                                                   selective, policy, cascade_models, cascade, export,
                                                   evaluate; for predict: roadwork run --until predict)
  roadwork config show [CONFIG] [key=value ...]     print the resolved configuration
  roadwork data synthetic n=N size=PX seed=S out=DIR [label_noise=R]
                                                   write generated scenes and a manifest.csv into DIR
  roadwork predict BUNDLE PATH [PATH ...]           one JSON line per image (label, probability, set, abstain);
                  [out=DIR engine=local|ray]        or a resumable Parquet folder, locally or on Ray Data
  roadwork bench BUNDLE [batch=8] [select=true]     every runtime x precision side by side: size, accuracy,
                                                   ECE, ms/img, img/s, vs torch eager; selects the fastest
  roadwork compare [CONFIG] [key=value ...] [frameworks=sklearn,lightgbm]
                                                   gradient-boosting frameworks side by side on the same
                                                   image features and splits (accuracy, ECE, sets, µs/row)
  roadwork monitor REFERENCE CURRENT [psi=0.25] [class_mix=0.15] [abstain=0.15] [out=drift.json]
                                                   drift of served predictions (a log_dir, a JSON-lines
                                                   file from predict) against a bundle's calibration split
  roadwork sweep [CONFIG] space=SPACE.yaml trials=N [metric=val_loss direction=minimize engine=local|ray]
                                                   Optuna search (SQLite, resumable, pruning on val loss);
                                                   engine=ray: Ray Tune with Optuna search and ASHA
  roadwork dvc [CONFIG] [key=value ...] [out=DIR]   write dvc.yaml + roadwork.yaml: every stage as a DVC stage
  roadwork serve BUNDLE|models:/NAME/VER [key=value ...]
                                                   HTTP server: OIP v2, /v1/classify, /metrics (no torch);
                                                   keys: host port device max_batch_size max_latency_ms
                                                   max_queue body_timeout_s max_body_mb max_pixels
                                                   drain_delay_s drain_timeout_s require_signature
                                                   log_dir (prediction logs for roadwork monitor);
                                                   ROADWORK_API_KEY=... requires 'Authorization: Bearer ...'
  roadwork sign BUNDLE KEY | roadwork sign keygen KEY
                                                   Ed25519-sign a bundle (signature.json); keygen writes
                                                   KEY and KEY.pub (for serve require_signature=KEY.pub)
  roadwork help [COMMAND]                           this text, or one command's usage and examples
                                                   (the same as roadwork COMMAND --help)

CONFIG is a YAML file or a preset (default, demo). Overrides use dotted keys and YAML values.

Examples:
  roadwork demo                                     # ~6 min on 2 CPU cores; prints a summary and the report path
  roadwork demo train.epochs=3 data.synthetic.n=1500
  roadwork run demo name=fog data.synthetic.seed=7 --force train
  roadwork run demo cascade.enabled=false            # the model alone, no cascade in front of it
  roadwork run demo cascade.small.deferral=learned cascade.small.gatekeeper_epochs=0
  roadwork run data.source=path/to/folder name=mydata   # one subfolder per class
  roadwork run data.source=manifest.csv conformal.alpha=0.05 selective.target_risk=0.01
  roadwork config show demo train.lr=1e-3
  roadwork data synthetic n=200 out=scenes/
  roadwork predict runs/demo/export/bundle scenes/000001.jpg
  roadwork compare demo frameworks=sklearn,xgboost,lightgbm,catboost
  roadwork serve runs/demo/export/bundle port=8000 max_batch_size=16
  roadwork serve runs/demo/export/bundle log_dir=logs/ && roadwork monitor runs/demo/export/bundle logs/
  roadwork run demo tracking.register_as=roadwork-demo && roadwork serve models:/roadwork-demo/1
  curl -s --data-binary @scenes/000001.jpg -H 'content-type: image/jpeg' localhost:8000/v1/classify
"""


# The stage commands (roadwork.pipeline.STAGE_NAMES, spelt out so that help needs no import; a test keeps them equal).
STAGES = (
    "data",
    "train",
    "predict",
    "calibrate",
    "cascade_models",
    "cascade",
    "conformal",
    "selective",
    "policy",
    "export",
    "evaluate",
)

_STAGE_HELP = """\
Usage: roadwork {stage} [CONFIG] [key=value ...] [--force STAGE]

Runs the pipeline up to and including the {stage!r} stage (stages whose inputs, config and code are unchanged
are cache hits). The run folder is ROOT/NAME/ (root=runs name=demo by default: runs/demo/{stage}/).

Examples:
  roadwork {stage} demo
  roadwork {stage} demo name=fog --force {stage}
"""

COMMAND_HELP: dict[str, str] = {
    "demo": """\
Usage: roadwork demo [key=value ...] [--force STAGE]

The whole job (data → train → predict → calibrate → conformal → selective → policy → cascade → export →
evaluate) on generated roadwork scenes, with the demo preset. Prints a summary and the report path.

Examples:
  roadwork demo
  roadwork demo train.epochs=3 data.synthetic.n=1500
  roadwork demo --force train
""",
    "run": """\
Usage: roadwork run [CONFIG] [key=value ...] [--force STAGE] [--until STAGE]

Runs (or reuses from cache) every stage. CONFIG is a YAML file or a preset (default, demo); overrides are
dotted keys with YAML values. The run folder is ROOT/NAME/: set it with root= and name= (run takes no out=).
--force STAGE reruns a stage and everything after it; --until STAGE stops after it.

Examples:
  roadwork run demo name=fog data.synthetic.seed=7 --force train
  roadwork run data.source=path/to/folder name=mydata root=experiments
  roadwork run data.source=manifest.csv conformal.alpha=0.05 selective.target_risk=0.01
  roadwork run demo --until predict
""",
    "config": """\
Usage: roadwork config show [CONFIG] [key=value ...]

Prints the resolved configuration (defaults ← CONFIG ← overrides) as YAML; a typo gets a suggestion.

Examples:
  roadwork config show demo train.lr=1e-3
  roadwork config show my.yaml > resolved.yaml
""",
    "data": """\
Usage: roadwork data synthetic n=N [size=PX] [seed=S] [label_noise=R] out=DIR
       roadwork data [CONFIG] [key=value ...]     (the pipeline's data stage)

'data synthetic' writes generated scenes and a manifest.csv (path, label, slice columns) into DIR.
'data' alone runs the pipeline up to its data stage (runs/NAME/data/dataset.parquet).

Examples:
  roadwork data synthetic n=200 out=scenes/
  roadwork data synthetic n=1000 size=128 seed=3 label_noise=0.05 out=noisy/
  roadwork data demo data.source=path/to/folder name=mydata
""",
    "predict": """\
Usage: roadwork predict BUNDLE PATH [PATH ...] [out=DIR] [engine=local|ray] [batch=64] [workers=2]

PATH is an image, a folder of images or a .csv/.parquet manifest (path + metadata columns). Without out=,
prints one JSON line per image (label, probability, prediction set, abstain, stage). With out=DIR, writes a
resumable Parquet folder, locally or on Ray Data (engine=ray, workers actors of batch images each).
(The pipeline stage of the same name: roadwork run --until predict.)

Examples:
  roadwork predict runs/demo/export/bundle scenes/000001.jpg
  roadwork predict runs/demo/export/bundle scenes/manifest.csv out=preds/
  roadwork predict runs/demo/export/bundle scenes/ out=preds/ engine=ray workers=4
""",
    "bench": """\
Usage: roadwork bench BUNDLE [batch=8] [seconds=3] [rounds=5] [threads=0] [images=FOLDER|manifest.csv]
                      [select=false] [max_accuracy_drop=0.5] [max_ece_increase=0.01]

Every runtime x precision of the model (ONNX Runtime fp32/int8, OpenVINO fp32/bf16, torch eager) measured
side by side in one interleaved run: size, accuracy and ECE (each through its own policy) and their change vs
fp32, ms/img, img/s, speed-up over torch eager. Marks the fastest variant with a certified policy within the
accuracy/ECE budget and not slower than fp32; select=true records it in the bundle (runtime.json), which
roadwork serve BUNDLE variant=auto serves. Labelled images: images=, else the run's test split.

Examples:
  roadwork bench runs/demo/export/bundle
  roadwork bench runs/demo/export/bundle batch=32 seconds=10 threads=2
  roadwork bench runs/demo/export/bundle images=photos/ select=true
""",
    "compare": """\
Usage: roadwork compare [CONFIG] [key=value ...] [frameworks=sklearn,lightgbm,...]

Gradient-boosting frameworks side by side on the same image features and splits (accuracy, ECE, set size,
µs/row); writes ROOT/NAME/compare.json.

Examples:
  roadwork compare demo
  roadwork compare demo frameworks=sklearn,xgboost,lightgbm,catboost
""",
    "monitor": """\
Usage: roadwork monitor REFERENCE CURRENT [psi=0.25] [class_mix=0.15] [abstain=0.15] [min_rows=50] [out=FILE]

Drift of served predictions (a serve log_dir or a JSON-lines file from predict) against REFERENCE: a bundle
or run folder (its calibration split) or another prediction log. out= is the JSON report file.

Examples:
  roadwork monitor runs/demo/export/bundle logs/
  roadwork monitor runs/demo/export/bundle today.jsonl psi=0.1 out=drift.json
""",
    "sweep": """\
Usage: roadwork sweep [CONFIG] space=SPACE.yaml trials=N [metric=val_loss] [direction=minimize]
                      [engine=local|ray] [key=value ...]

Hyper-parameter search. engine=local (default): Optuna (TPE, SQLite study under ROOT/NAME-sweep/,
resumable, median pruning on val loss). engine=ray: Ray Tune with the same space (OptunaSearch, ASHA
stopping); ray.init() first to use a cluster, a local one is started otherwise. Writes best.yaml.

SPACE.yaml maps config keys to {type: float|int|choice, low, high, log, choices}.

Examples:
  roadwork sweep demo space=space.yaml trials=20
  roadwork sweep demo space=space.yaml trials=50 engine=ray
  roadwork sweep demo space=space.yaml trials=10 metric=test.accuracy direction=maximize
""",
    "dvc": """\
Usage: roadwork dvc [CONFIG] [key=value ...] [out=DIR]

Writes DIR/dvc.yaml (every stage a DVC stage: its command, deps including the roadwork source, outs, params,
metrics and plots) and DIR/roadwork.yaml (the resolved configuration). Then: cd DIR && dvc repro.

Examples:
  roadwork dvc demo out=. && dvc repro && dvc metrics show
  roadwork dvc demo train.epochs=3 out=experiments/
""",
    "serve": """\
Usage: roadwork serve BUNDLE|models:/NAME/VERSION [key=value ...] [tracking_uri=URI]

HTTP server (no torch): Open Inference Protocol v2, POST /v1/classify, /metrics for Prometheus.
Keys: host port name device (cpu|cuda|tensorrt|auto; trt_fp16 trt_cache_dir) max_batch_size
max_queue_delay_ms max_latency_ms (latency budget; 0 = auto) max_queue max_queue_wait_ms body_timeout_s
max_body_mb max_pixels max_inflight_pixels ort_threads drain_delay_s drain_timeout_s require_signature
(a public key: refuse unsigned bundles) log_dir (prediction logs for roadwork monitor). ROADWORK_API_KEY=...
requires 'Authorization: Bearer ...'. A models:/ URI is fetched from the MLflow registry first.

Examples:
  roadwork serve runs/demo/export/bundle port=8000 max_batch_size=16
  roadwork serve runs/demo/export/bundle log_dir=logs/
  roadwork serve runs/demo/export/bundle require_signature=keys/release.pub device=auto
  roadwork serve models:/roadwork-demo/1
""",
    "sign": """\
Usage: roadwork sign BUNDLE KEY          sign BUNDLE with the Ed25519 private key KEY (PEM)
       roadwork sign keygen KEY          write a new key pair: KEY (private, mode 0600) and KEY.pub

Checks every file of the bundle against its manifest, then writes BUNDLE/signature.json (an Ed25519
signature of the manifest, which holds every file's sha256). roadwork serve BUNDLE require_signature=KEY.pub
refuses a bundle that is unsigned, signed by another key, or changed since.

Examples:
  roadwork sign keygen keys/release
  roadwork sign runs/demo/export/bundle keys/release
  roadwork serve runs/demo/export/bundle require_signature=keys/release.pub
""",
    "help": """\
Usage: roadwork help [COMMAND]

The list of commands, or one command's usage and examples (the same as roadwork COMMAND --help).

Examples:
  roadwork help
  roadwork help sweep
""",
}


def command_help(cmd: str) -> str | None:
    """The usage and examples of one command; ``None`` for an unknown one."""
    if cmd == "serve":  # the settings grow: every key, read from the settings model itself
        from roadwork.serve.settings import ServeSettings

        keys = " ".join(k for k in ServeSettings.model_fields if k != "api_key")
        return f"{COMMAND_HELP[cmd].rstrip()}\n\nEvery key: {keys}\n"
    if cmd in COMMAND_HELP:
        return COMMAND_HELP[cmd]
    if cmd in STAGES:
        return _STAGE_HELP.format(stage=cmd)
    # a command with no text of its own: its lines of the overview
    lines = [ln for ln in HELP.splitlines() if ln.strip().startswith(f"roadwork {cmd}")]
    return "\n".join(lines) if lines else None


def commands() -> list[str]:
    """Every command name: those with a help text, the stages, and any other the overview lists."""
    import re

    listed = re.findall(r"^  roadwork ([a-z_]+)", HELP, flags=re.MULTILINE)
    return sorted({*COMMAND_HELP, *STAGES, *listed})


def _suggest_command(cmd: str) -> str:
    import difflib

    close = difflib.get_close_matches(cmd, commands(), n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


def _print(msg: str = "") -> None:
    print(msg, flush=True)


def _split_flags(args: list[str], flags: tuple[str, ...]) -> tuple[list[str], dict[str, list[str]]]:
    rest: list[str] = []
    found: dict[str, list[str]] = {f: [] for f in flags}
    i = 0
    while i < len(args):
        a = args[i]
        name, _, val = a.partition("=")
        if name in flags:
            if not val:
                if i + 1 >= len(args):
                    raise RoadworkError(f"{name} needs a value, e.g. {name} train.")
                val = args[i + 1]
                i += 1
            found[name].append(val)
        elif a.startswith("--"):
            raise RoadworkError(
                f"Unknown option {a!r}. Options: {', '.join(flags) or 'none'}. See 'roadwork help'."
            )
        else:
            rest.append(a)
        i += 1
    return rest, found


def _config_and_overrides(args: list[str]) -> tuple[str | None, list[str]]:
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


def _summary(result: object) -> None:
    from rich.console import Console
    from rich.table import Table

    from roadwork.evaluation.report import summary_rows
    from roadwork.pipeline import RunResult

    assert isinstance(result, RunResult)
    console = Console()
    t = Table(title="stages", show_lines=False)
    for col in ("stage", "status", "seconds"):
        t.add_column(col, justify="right" if col == "seconds" else "left")
    for r in result.stages:
        t.add_row(r.name, "[green]cached[/green]" if r.cached else "ran", f"{r.seconds:.1f}")
    console.print(t)
    m = result.metrics
    if m is not None:
        s = Table(title="test results")
        s.add_column("metric")
        s.add_column("value", justify="right")
        for k, v in summary_rows(m):
            s.add_row(k, v)
        console.print(s)
        worst = sorted(m["slices"].items(), key=lambda kv: kv[1]["accuracy"])[:4]
        if worst:
            console.print("hardest slices: " + ", ".join(f"{k} ({v['accuracy']:.3f})" for k, v in worst))
        for w in m.get("warnings", []):
            console.print(f"[bold yellow]warning:[/bold yellow] {w}", highlight=False)
    if result.report.is_file():
        console.print(f"report:  {result.report}")
    if result.bundle.is_dir():
        console.print(f"bundle:  {result.bundle}   (try: roadwork predict {result.bundle} IMAGE)")
    if result.tracking_uri:
        console.print(f"MLflow:  mlflow ui --backend-store-uri {result.tracking_uri}")


def _run(config: str | None, overrides: list[str], force: list[str], until: str | None) -> int:
    from roadwork.config import ConfigError, load_config
    from roadwork.pipeline import run_pipeline

    out = next((o.partition("=")[2] for o in overrides if o.partition("=")[0].strip() == "out"), None)
    if out is not None:  # predict, dvc and data synthetic take out=DIR; a run's folder is ROOT/NAME
        raise ConfigError(
            f"A run takes no out= (got out={out!r}): it writes into ROOT/NAME/. Use root= and name=, "
            "e.g. root=runs name=fog writes runs/fog/."
        )
    cfg = load_config(config, overrides)  # fails here, before any work, on a bad key or value
    t0 = time.perf_counter()

    def on_stage(r: object) -> None:
        from roadwork.pipeline.runner import StageResult

        assert isinstance(r, StageResult)
        status = "cached" if r.cached else f"done in {r.seconds:.1f}s"
        print(f"[{r.name}] {status}", file=sys.stderr, flush=True)

    result = run_pipeline(
        cfg,
        force=force,
        until=until,
        progress=sys.stderr.isatty() or "CI" not in os.environ,
        on_stage=on_stage,
    )
    _summary(result)
    _print(f"total: {time.perf_counter() - t0:.1f}s")
    return 0


def _synthetic(args: list[str]) -> int:
    from roadwork.config import ConfigError, load_config, parse_overrides
    from roadwork.data.synthetic import CLASSES, generate_dataset

    values = parse_overrides(args)
    out = values.pop("out", None)
    if not out:
        raise ConfigError("roadwork data synthetic needs out=DIR, the folder to write images into.")
    s = load_config(None, {"data": {"synthetic": values}}).data.synthetic  # same checks and messages as a run
    out_dir = Path(str(out))
    rows = generate_dataset(out_dir, s)
    import csv

    cols = [
        "path",
        "label",
        "weather",
        "time",
        "camera",
        "domain",
        "zone_distance",
        "distractor",
        "label_flipped",
    ]
    with open(out_dir / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in rows:
            w.writerow([r["path"], CLASSES[int(r["label"])]] + [r[c] for c in cols[2:]])  # type: ignore[call-overload]
    _print(f"wrote {len(rows)} images and {out_dir / 'manifest.csv'}")
    return 0


def _predict(args: list[str]) -> int:
    from roadwork.export.bundle import Bundle

    opts = {a.partition("=")[0]: a.partition("=")[2] for a in args[1:] if "=" in a}
    sources = [a for a in args[1:] if "=" not in a]
    if not args or "=" in args[0] or not sources:
        raise RoadworkError(
            "Usage: roadwork predict BUNDLE PATH [PATH ...] [out=DIR engine=local|ray batch=64 workers=2 "
            "device=cpu|cuda|tensorrt|auto]; PATH is "
            "an image, a folder of images or a .csv/.parquet manifest (path + metadata columns)."
        )
    unknown = set(opts) - {"out", "engine", "batch", "workers", "device"}
    if unknown:
        raise RoadworkError(
            f"roadwork predict: unknown option {sorted(unknown)[0]!r}; use out, engine, batch, workers or device."
        )
    device = opts.get("device", "cpu")
    engine = opts.get("engine", "local")
    if engine not in ("local", "ray"):
        raise RoadworkError(f"roadwork predict: engine={engine!r} is not local or ray.")
    if engine == "ray" and "out" not in opts:
        raise RoadworkError("roadwork predict: engine=ray writes a Parquet folder; pass out=DIR.")
    try:
        batch, workers = int(opts.get("batch", 64)), int(opts.get("workers", 2))
    except ValueError:
        raise RoadworkError("roadwork predict: batch and workers must be whole numbers.") from None
    from roadwork.scale.batch import list_images

    items = list_images(sources)
    if "out" in opts:  # batch mode: a resumable Parquet folder
        from roadwork.scale.batch import predict_local, predict_ray, read_skipped

        if engine == "ray":
            n = predict_ray(args[0], items, opts["out"], batch_size=batch, actors=workers)
        else:
            n = predict_local(args[0], items, opts["out"], batch_size=batch, device=device)
        skipped = len(read_skipped(opts["out"]))
        _print(
            f"predicted {n} images ({len(items) - n - skipped} already in {opts['out']}"
            + (f", {skipped} unreadable: see {Path(opts['out']) / 'skipped.csv'}" if skipped else "")
            + "); read with pandas.read_parquet"
        )
        return 0
    from roadwork.export.onnx import execution_device

    with execution_device(device):
        bundle = Bundle.load(args[0])
    paths = items["path"].tolist()
    meta_cols = [c for c in items.columns if c != "path"]
    for i in range(0, len(paths), 64):
        slices = {c: items[c].tolist()[i : i + 64] for c in meta_cols} or None
        for rec in bundle.predict_paths(paths[i : i + 64], slices=slices):
            print(json.dumps(rec), flush=True)
    return 0


def _bench(args: list[str]) -> int:
    from roadwork.export.bench import bench_cli

    _print(bench_cli(args))
    return 0


def _compare(args: list[str]) -> int:
    from rich.console import Console

    from roadwork.config import load_config
    from roadwork.data.features import images_features
    from roadwork.data.preprocess import load_rgb
    from roadwork.evaluation.compare import compare_frameworks, format_compare
    from roadwork.models.boosting import FRAMEWORKS, BoostingParams
    from roadwork.pipeline import run_pipeline
    from roadwork.pipeline.stages import _abs_paths, _labels, load_dataset

    frameworks = list(FRAMEWORKS)
    rest = []
    for a in args:
        if a.startswith("frameworks="):
            frameworks = [f for f in a.partition("=")[2].split(",") if f]
            bad = [f for f in frameworks if f not in FRAMEWORKS]
            if bad:
                raise RoadworkError(
                    f"roadwork compare: frameworks={','.join(bad)} is unknown; choose from {','.join(FRAMEWORKS)}."
                )
        else:
            rest.append(a)
    config, overrides = _config_and_overrides(rest)
    cfg = load_config(config, overrides)
    result = run_pipeline(cfg, until="data", progress=True)
    data_dir = result.run_dir / "data"
    df, classes = load_dataset(data_dir)
    feats, labels = {}, {}
    for split in ("train", "calib", "test"):
        part = df[df["split"] == split]
        feats[split] = images_features([load_rgb(p) for p in _abs_paths(part, data_dir)])
        labels[split] = _labels(part, classes)
    c = cfg.cascade
    params = BoostingParams(rounds=c.boosting_rounds, max_depth=c.boosting_depth, seed=cfg.train.seed)
    rows = compare_frameworks(
        feats, labels, len(classes), alpha=cfg.conformal.alpha, params=params, frameworks=frameworks
    )
    out = result.run_dir / "compare.json"
    out.write_text(json.dumps(rows, indent=2))
    Console().print(format_compare(rows, alpha=cfg.conformal.alpha))
    _print(f"rows: {out}")
    return 0


def _monitor(args: list[str]) -> int:
    from rich.console import Console
    from rich.table import Table

    from roadwork.monitor.drift import DriftThresholds, compare_predictions, load_predictions

    paths = [a for a in args if "=" not in a]
    if len(paths) != 2:
        raise RoadworkError(
            "Usage: roadwork monitor REFERENCE CURRENT [psi=0.25] [class_mix=0.15] [abstain=0.15] [min_rows=50] "
            "[out=drift.json]; REFERENCE: a bundle or run folder (its calibration split) or a prediction log."
        )
    opts: dict[str, str] = {}
    for a in args:
        if "=" in a:
            key, _, val = a.partition("=")
            if key not in ("psi", "class_mix", "abstain", "min_rows", "out"):
                raise RoadworkError(
                    f"roadwork monitor: unknown option {key!r}; use psi, class_mix, abstain, min_rows or out."
                )
            opts[key] = val
    try:
        d = DriftThresholds()
        th = DriftThresholds(
            psi=float(opts.get("psi", d.psi)),
            class_mix=float(opts.get("class_mix", d.class_mix)),
            abstain=float(opts.get("abstain", d.abstain)),
            min_rows=int(opts.get("min_rows", d.min_rows)),
        )
    except ValueError as e:
        raise RoadworkError(f"roadwork monitor: thresholds must be numbers ({e}).") from None
    report = compare_predictions(load_predictions(paths[0]), load_predictions(paths[1]), thresholds=th)
    t = Table(title=f"drift: {paths[1]} vs {paths[0]}")
    for col in (
        "scope",
        "n ref / cur",
        "confidence PSI",
        "KS p",
        "mean conf",
        "class mix TV",
        "abstain rate",
        "drift",
    ):
        t.add_column(col, justify="left" if col in ("scope", "drift") else "right")
    for scope, r in [("overall", report["overall"]), *report["slices"].items()]:
        t.add_row(
            scope,
            f"{r['n_reference']} / {r['n_current']}",
            f"{r['psi_confidence']:.3f}",
            f"{r['ks_pvalue']:.2g}",
            f"{r['mean_confidence'][0]:.3f} → {r['mean_confidence'][1]:.3f}",
            f"{r['class_mix_tv']:.3f}",
            f"{r['abstain_rate'][0]:.3f} → {r['abstain_rate'][1]:.3f}",
            "; ".join(r["reasons"]) or "no",
        )
    Console().print(t)
    if "out" in opts:
        Path(opts["out"]).write_text(json.dumps(report, indent=2))
        _print(f"report: {opts['out']}")
    _print(
        "DRIFT: the served traffic no longer looks like the calibration split; the guarantees may not hold."
        if report["drift"]
        else "no drift beyond the thresholds."
    )
    return 0


def _sweep(args: list[str]) -> int:
    from roadwork.config import load_config
    from roadwork.scale.sweep import load_space, run_sweep, run_sweep_ray

    own = {"space", "trials", "metric", "direction", "engine"}
    opts = {a.partition("=")[0]: a.partition("=")[2] for a in args if a.partition("=")[0] in own}
    if "space" not in opts or "trials" not in opts:
        raise RoadworkError(
            "Usage: roadwork sweep [CONFIG] space=SPACE.yaml trials=N [metric=val_loss] [direction=minimize] "
            "[engine=local|ray]; see roadwork sweep --help"
        )
    try:
        trials = int(opts["trials"])
    except ValueError:
        raise RoadworkError(f"roadwork sweep: trials={opts['trials']!r} is not a whole number.") from None
    direction = opts.get("direction", "minimize")
    if direction not in ("minimize", "maximize"):
        raise RoadworkError(f"roadwork sweep: direction={direction!r} is not minimize or maximize.")
    engine = opts.get("engine", "local")
    if engine not in ("local", "ray"):
        raise RoadworkError(f"roadwork sweep: engine={engine!r} is not local (Optuna) or ray (Ray Tune).")
    config, overrides = _config_and_overrides([a for a in args if a.partition("=")[0] not in own])
    cfg = load_config(config, overrides)
    search = run_sweep_ray if engine == "ray" else run_sweep
    res = search(
        cfg,
        load_space(opts["space"], cfg),
        trials=trials,
        metric=opts.get("metric", "val_loss"),
        direction=direction,
    )
    for row in res["trials"]:
        _print(json.dumps(row, default=str))
    _print(f"best: {res['best']['value']:.4f} {res['best']['params']}")
    _print(f"re-run it: roadwork run {res['dir']}/best.yaml")
    return 0


def _dvc(args: list[str]) -> int:
    import yaml

    from roadwork.config import dump_config, load_config
    from roadwork.pipeline.dvc import dvc_stages

    out = Path(next((a.partition("=")[2] for a in args if a.startswith("out=")), "."))
    config, overrides = _config_and_overrides([a for a in args if not a.startswith("out=")])
    cfg = load_config(config, overrides)
    out.mkdir(parents=True, exist_ok=True)
    (out / "roadwork.yaml").write_text(dump_config(cfg))
    spec = dvc_stages(cfg, base=out)
    (out / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    _print(
        f"wrote {out / 'dvc.yaml'} ({len(spec['stages'])} stages) and {out / 'roadwork.yaml'}; run: dvc repro"
    )
    return 0


def _sign(args: list[str]) -> int:
    from roadwork.export.signing import generate_keypair, sign_bundle

    if len(args) == 2 and args[0] == "keygen":
        pub = generate_keypair(args[1])
        _print(f"wrote {args[1]} (private: keep it secret) and {pub} (public: for serve require_signature=)")
        return 0
    if len(args) != 2:
        raise RoadworkError(
            "Usage: roadwork sign BUNDLE KEY, or roadwork sign keygen KEY (see roadwork sign --help)."
        )
    out = sign_bundle(args[0], args[1])
    _print(f"signed {args[0]}: {out}")
    return 0


def _serve(args: list[str]) -> int:
    import yaml
    from pydantic import ValidationError

    from roadwork.serve.settings import ServeSettings

    if not args or "=" in args[0]:
        raise RoadworkError(
            "Usage: roadwork serve BUNDLE [key=value ...], e.g. roadwork serve runs/demo/export/bundle"
        )
    values: dict[str, object] = {}
    tracking_uri = next((a.partition("=")[2] for a in args[1:] if a.startswith("tracking_uri=")), None)
    args = [a for a in args if not a.startswith("tracking_uri=")]
    for a in args[1:]:
        key, eq, val = a.partition("=")
        if not eq:
            raise RoadworkError(f"roadwork serve: {a!r} is not key=value (e.g. port=8000).")
        if key not in ServeSettings.model_fields:
            import difflib

            close = difflib.get_close_matches(key, list(ServeSettings.model_fields), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise RoadworkError(f"roadwork serve: unknown setting {key!r}.{hint}")
        values[key] = yaml.safe_load(val) if val else None
    if os.environ.get("ROADWORK_API_KEY"):
        values.setdefault("api_key", os.environ["ROADWORK_API_KEY"])
    try:
        settings = ServeSettings(**values)
    except ValidationError as e:
        err = e.errors()[0]
        raise RoadworkError(
            f"roadwork serve: {err['loc'][0]}={values.get(str(err['loc'][0]))!r}: {err['msg']}."
        ) from None
    from roadwork.serve import serve

    target = args[0]
    if target.startswith(("models:/", "runs:/")):  # a registered MLflow model: fetch its bundle first
        from roadwork.pipeline.registry import resolve_bundle

        uri = (
            tracking_uri
            or os.environ.get("MLFLOW_TRACKING_URI")
            or f"sqlite:///{Path('runs').resolve() / 'mlflow.db'}"
        )
        target = str(resolve_bundle(target, tracking_uri=uri))
    serve(target, settings)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help") or args == ["help"]:
        _print(HELP)
        return 0
    cmd, rest = args[0], args[1:]
    if cmd == "help" or "--help" in rest or "-h" in rest:  # roadwork help CMD, roadwork CMD --help
        topic = rest[0] if cmd == "help" and rest[0] not in ("--help", "-h") else cmd
        text = command_help(topic)
        if text is None:
            print(
                f"error: Unknown command {topic!r}.{_suggest_command(topic)} Run 'roadwork help'.",
                file=sys.stderr,
            )
            return 2
        _print(text.rstrip())
        return 0
    try:
        if cmd == "demo":
            rest, flags = _split_flags(rest, ("--force",))
            return _run("demo", rest, flags["--force"], None)
        if cmd == "run":
            rest, flags = _split_flags(rest, ("--force", "--until"))
            config, overrides = _config_and_overrides(rest)
            until = flags["--until"][-1] if flags["--until"] else None
            return _run(config, overrides, flags["--force"], until)
        if cmd == "config":
            if not rest or rest[0] != "show":
                raise RoadworkError("Usage: roadwork config show [CONFIG] [key=value ...]")
            from roadwork.config import dump_config, load_config

            config, overrides = _config_and_overrides(rest[1:])
            _print(dump_config(load_config(config, overrides)).rstrip())
            return 0
        if cmd == "data" and rest and rest[0] == "synthetic":
            return _synthetic(rest[1:])
        if cmd == "predict":
            return _predict(rest)
        if cmd == "serve":
            return _serve(rest)
        if cmd == "sign":
            return _sign(rest)
        if cmd == "bench":
            return _bench(rest)
        if cmd == "compare":
            return _compare(rest)
        if cmd == "monitor":
            return _monitor(rest)
        if cmd == "dvc":
            return _dvc(rest)
        if cmd == "sweep":
            return _sweep(rest)
        if cmd in STAGES:
            rest, flags = _split_flags(rest, ("--force",))
            config, overrides = _config_and_overrides(rest)
            return _run(config, overrides, flags["--force"], cmd)
        raise RoadworkError(
            f"Unknown command {cmd!r}.{_suggest_command(cmd)} Run 'roadwork help' for the commands."
        )
    except RoadworkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "interrupted: completed stages are kept; run the same command again to resume.", file=sys.stderr
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
