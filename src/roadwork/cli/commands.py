"""What each command does, given its parsed arguments (see :mod:`roadwork.cli.specs` for the grammar).

Every heavy import happens inside the handler that needs it, so ``roadwork help`` stays fast.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from roadwork.cli.grammar import Parsed, usage_error
from roadwork.errors import InputError

__all__ = [
    "audit",
    "bench",
    "compare",
    "config_show",
    "data_synthetic",
    "dvc",
    "label_next",
    "monitor",
    "predict",
    "print_summary",
    "recertify",
    "run",
    "serve",
    "sign",
    "sign_keygen",
    "sweep",
]


def _print(msg: str = "") -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------- the pipeline


def print_summary(result: Any) -> None:
    """The stages table, the test results, the hardest slices, the warnings and where the outputs are."""
    from rich.console import Console
    from rich.table import Table

    from roadwork.evaluation.report import model_check_line, summary_rows

    console = Console()
    t = Table(title="stages", show_lines=False)
    for col in ("stage", "status", "seconds"):
        t.add_column(col, justify="right" if col == "seconds" else "left")
    for r in result.stages:
        t.add_row(r.name, "[green]cached[/green]" if r.cached else "ran", f"{r.seconds:.1f}")
    console.print(t)
    m = result.metrics
    checked: set[str] = set()
    if m is not None and m.get("model_check"):  # before any calibration figure: is the model worth them?
        mc = m["model_check"]
        colour = "green" if mc["verdict"] == "ok" else "bold red"
        console.print(f"[{colour}]{model_check_line(m)}[/{colour}]", highlight=False)
        for w in mc["warnings"]:
            console.print(f"[bold red]warning:[/bold red] {w}", highlight=False)
        checked = set(mc["warnings"])
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
        for w in (w for w in m.get("warnings", []) if w not in checked):
            console.print(f"[bold yellow]warning:[/bold yellow] {w}", highlight=False)
    if result.report.is_file():
        console.print(f"report:  {result.report}")
    if result.bundle.is_dir():
        console.print(f"bundle:  {result.bundle}   (try: roadwork predict {result.bundle} IMAGE)")
    if result.tracking_uri:
        console.print(f"MLflow:  mlflow ui --backend-store-uri {result.tracking_uri}")


def _on_stage(r: Any) -> None:
    status = "cached" if r.cached else f"done in {r.seconds:.1f}s"
    if r.name == "data" and "n" in r.info:  # what a user of their own folder needs to see at once
        skipped = int(r.info.get("skipped", 0))
        status += f": {r.info['n']} images"
        if skipped:
            status += f", {skipped} skipped as unusable (reasons: {r.path / 'data_report.json'})"
    print(f"[{r.name}] {status}", file=sys.stderr, flush=True)


def run(p: Parsed, *, until: str | None = None, config: str | None = None) -> int:
    """``roadwork run``, ``roadwork demo`` (``config='demo'``) and ``roadwork STAGE`` (``until=STAGE``)."""
    from roadwork.config import ConfigError
    from roadwork.pipeline import run_pipeline

    out = next((o.partition("=")[2] for o in p.overrides if o.partition("=")[0].strip() == "out"), None)
    if out is not None:  # predict, dvc and data synthetic take out=DIR; a run's folder is ROOT/NAME
        raise ConfigError(
            f"A run takes no out= (got out={out!r}): it writes into ROOT/NAME/. Use root= and name=, "
            "e.g. root=runs name=fog writes runs/fog/."
        )
    from roadwork.training.recipes import run_config

    flags_until = p.flags.get("--until") or []
    # fails here, before any work, on a bad key or value, or hub weights neither cached nor reachable; own photos
    # with no model named get the pretrained recipe
    cfg = run_config(config or p.config, p.overrides, until or (flags_until[-1] if flags_until else None))
    t0 = time.perf_counter()
    result = run_pipeline(
        cfg,
        force=p.flags.get("--force", []),
        until=until or (flags_until[-1] if flags_until else None),
        progress=sys.stderr.isatty() or "CI" not in os.environ,
        on_stage=_on_stage,
    )
    print_summary(result)
    _print(f"total: {time.perf_counter() - t0:.1f}s")
    return 0


def config_show(p: Parsed) -> int:
    """Print the resolved configuration as YAML: exactly what ``roadwork run`` uses for the same arguments."""
    from roadwork.config import dump_config
    from roadwork.training.recipes import resolve_config

    cfg, notes = resolve_config(p.config, p.overrides)  # what `roadwork run` with these arguments would train
    for line in notes:
        print(line, file=sys.stderr, flush=True)
    _print(dump_config(cfg).rstrip())
    return 0


def data_synthetic(p: Parsed) -> int:
    """Write generated scenes and a manifest.csv."""
    import csv

    from roadwork.config import load_config
    from roadwork.data.synthetic import CLASSES, generate_dataset

    values = {k: v for k, v in p.options.items() if k in p.given and k != "out"}
    s = load_config(None, {"data": {"synthetic": values}}).data.synthetic  # same checks and messages as a run
    out_dir = Path(p.options["out"])
    rows = generate_dataset(out_dir, s)
    cols = ["path", "label", "weather", "time", "camera", "domain", "zone_distance", "distractor"]
    cols.append("label_flipped")
    with open(out_dir / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in rows:
            w.writerow([r["path"], CLASSES[int(r["label"])]] + [r[c] for c in cols[2:]])  # type: ignore[call-overload]
    _print(f"wrote {len(rows)} images and {out_dir / 'manifest.csv'}")
    return 0


# ------------------------------------------------------------------------------------- a bundle


def predict(p: Parsed) -> int:
    """One JSON line per image, or a resumable Parquet folder (out=DIR), locally or on Ray Data."""

    from roadwork.data.listing import IMAGE_SUFFIXES, shown
    from roadwork.scale.batch import list_images

    o = p.options
    if o["engine"] == "ray" and o["out"] is None:
        raise usage_error(p.command, "engine=ray writes a Parquet folder; pass out=DIR.")
    bundle_path = p.positionals["BUNDLE"]
    items = list_images(p.positionals["PATH"])
    unlisted = items.attrs.get("skipped", [])
    for (
        bad
    ) in unlisted:  # odd entries (empty manifest cells, non-UTF-8 names) are named, not the end of the job
        print(f"skipped {bad['path']}: {bad['reason']}", file=sys.stderr, flush=True)
    if (
        not len(items) and (Path(bundle_path) / "manifest.json").is_file()
    ):  # (a non-bundle: its own error first)
        where = ", ".join(shown(str(x)) for x in p.positionals["PATH"])
        raise InputError(
            f"no usable image in {where} ({len(unlisted)} entries skipped, each named above)."
            if unlisted
            else f"no image found in {where}: pass image files ({', '.join(sorted(IMAGE_SUFFIXES))}), folders of "
            "them, or a .csv/.parquet manifest with a 'path' column."
        )
    if o["out"] is not None:  # batch mode: a resumable Parquet folder
        from roadwork.scale.batch import SKIPPED, predict_local, predict_ray, read_skipped

        key = o["require_signature"]
        if o["engine"] == "ray":
            n = predict_ray(
                bundle_path,
                items,
                o["out"],
                batch_size=o["batch"],
                actors=o["workers"],
                require_signature=key,
            )
        else:
            n = predict_local(
                bundle_path,
                items,
                o["out"],
                batch_size=o["batch"],
                device=o["device"],
                say=_say_answers,
                require_signature=key,
            )
        listed = read_skipped(o["out"])  # this run's items only: the list keeps earlier runs' files too
        mine = {shown(str(q)) for q in items["path"]}  # as the list writes them
        skipped = int(listed["path"].isin(mine).sum()) if len(listed) else 0
        if n == 0 and skipped == len(items):
            raise InputError(
                f"none of the {len(items)} images could be read: see {Path(o['out']) / SKIPPED}."
            )
        _print(
            f"predicted {n} images ({len(items) - n - skipped} already in {o['out']}"
            + (f", {skipped} unreadable: see {Path(o['out']) / SKIPPED}" if skipped else "")
            + "); read with pandas.read_parquet"
        )
        return 0
    return _predict_lines(bundle_path, items, o["device"], o["require_signature"])


def _say_answers(statement: str, warning: bool) -> None:
    """What the bundle will do (the share it answers, or that it abstains on everything), on stderr."""
    print(("warning: " if warning else "") + statement, file=sys.stderr, flush=True)


def _predict_lines(bundle_path: str, items: Any, device: str, require_signature: str | None) -> int:
    """JSON lines on stdout, one per readable image, through the same predictor as out=DIR (the bundle's
    selected variant); an unreadable image is named on stderr with its reason and skipped, not the end of the
    job (as out=DIR lists it in _skipped.csv)."""
    import json

    from roadwork.scale.batch import BundlePredictor

    predictor = BundlePredictor(bundle_path, device=device, require_signature=require_signature)
    _say_answers(*predictor.bundle.answers_statement())
    skipped = 0
    for i in range(0, len(items), 64):
        for row in predictor(items.iloc[i : i + 64]).to_dict("records"):
            reason = row.pop("skip_reason", "")
            if reason:
                skipped += 1
                print(f"skipped {row['path']}: {reason}", file=sys.stderr, flush=True)
                continue
            print(json.dumps(row, default=_plain), flush=True)
    if skipped and skipped == len(items):
        raise InputError(f"none of the {len(items)} images could be read (each is named above).")
    unlisted = len(items.attrs.get("skipped", []))  # odd names and empty cells, named before the predictions
    if skipped or unlisted:
        total = len(items) + unlisted
        print(f"{skipped + unlisted} of {total} entries skipped (each named above)", file=sys.stderr)
    return 0


def _plain(v: Any) -> Any:
    """numpy scalars and arrays as JSON values."""
    return v.tolist() if hasattr(v, "tolist") else str(v)


def bench(p: Parsed) -> int:
    """Every runtime × precision of a bundle side by side."""
    from roadwork.export.bench import bench_bundle, format_table

    _print(format_table(bench_bundle(p.positionals["BUNDLE"], **p.options)))
    return 0


def serve(p: Parsed) -> int:
    """The HTTP server, on a bundle folder or a registered MLflow model (fetched first)."""
    from pydantic import ValidationError

    from roadwork.serve.settings import ServeSettings

    values = {k: v for k, v in p.options.items() if k in p.given and k != "tracking_uri"}
    if "ROADWORK_API_KEY" in os.environ:  # set but empty is an error, not "no auth" (ServeSettings says so)
        values.setdefault("api_key", os.environ["ROADWORK_API_KEY"])
    try:
        settings = ServeSettings(**values)
    except ValidationError as e:
        err = e.errors()[0]
        if not err["loc"]:  # a rule across settings (model validator): its message names them
            msg = str(err["msg"]).removeprefix("Value error, ")
            raise usage_error(p.command, f"{msg}.") from None
        key = str(err["loc"][0])
        shown = repr(values.get(key))
        shown = shown if len(shown) <= 200 else f"{shown[:200]}... ({len(shown)} characters)"
        raise usage_error(p.command, f"{key}={shown}: {err['msg']}.") from None
    if settings.api_key is None and settings.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"warning: host={settings.host} without an API key: anyone who reaches this port can classify; set "
            "ROADWORK_API_KEY or bind host=127.0.0.1",
            file=sys.stderr,
            flush=True,
        )
    from roadwork.serve import serve as serve_bundle

    target = p.positionals["BUNDLE"]
    if target.startswith(("models:/", "runs:/")):  # a registered MLflow model: fetch its bundle first
        from roadwork.pipeline.registry import resolve_bundle

        uri = (
            p.options["tracking_uri"]
            or os.environ.get("MLFLOW_TRACKING_URI")
            or f"sqlite:///{Path('runs').resolve() / 'mlflow.db'}"
        )
        target = str(resolve_bundle(target, tracking_uri=uri))
    serve_bundle(target, settings)
    return 0


def sign(p: Parsed) -> int:
    """Ed25519-sign a bundle."""
    from roadwork.export.signing import sign_bundle

    out = sign_bundle(p.positionals["BUNDLE"], p.positionals["KEY"])
    _print(f"signed {p.positionals['BUNDLE']}: {out}")
    return 0


def sign_keygen(p: Parsed) -> int:
    """Write a new Ed25519 key pair."""
    from roadwork.export.signing import generate_keypair

    key = p.positionals["KEY"]
    pub = generate_keypair(key)
    _print(f"wrote {key} (private: keep it secret) and {pub} (public: for serve require_signature=)")
    return 0


# ------------------------------------------------------------------------------------- studies


def compare(p: Parsed) -> int:
    """Gradient-boosting frameworks side by side on the same image features and splits."""
    import json

    from rich.console import Console

    from roadwork.config import load_config
    from roadwork.data.features import images_features
    from roadwork.data.preprocess import load_rgb
    from roadwork.evaluation.compare import compare_frameworks, format_compare
    from roadwork.models.boosting import FRAMEWORKS, BoostingParams
    from roadwork.pipeline import run_pipeline
    from roadwork.pipeline.artifacts import abs_paths, label_indices, load_dataset

    cfg = load_config(p.config, p.overrides)
    result = run_pipeline(cfg, until="data", progress=True)
    data_dir = result.run_dir / "data"
    df, classes = load_dataset(data_dir)
    feats, labels = {}, {}
    for split in ("train", "calib", "test"):
        part = df[df["split"] == split]
        feats[split] = images_features([load_rgb(path) for path in abs_paths(part, data_dir)])
        labels[split] = label_indices(part, classes)
    c = cfg.cascade
    params = BoostingParams(rounds=c.boosting_rounds, max_depth=c.boosting_depth, seed=cfg.train.seed)
    frameworks = p.options["frameworks"] or list(FRAMEWORKS)
    rows = compare_frameworks(
        feats, labels, len(classes), alpha=cfg.conformal.alpha, params=params, frameworks=frameworks
    )
    out = result.run_dir / "compare.json"
    out.write_text(json.dumps(rows, indent=2))
    Console().print(format_compare(rows, alpha=cfg.conformal.alpha))
    _print(f"rows: {out}")
    return 0


def _drift_table(report: dict[str, Any], title: str) -> Any:
    from rich.table import Table

    t = Table(title=title)
    cols = ("scope", "n ref / cur", "confidence PSI", "KS p", "mean conf", "class mix TV", "abstain rate")
    for col in (*cols, "drift"):
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
    return t


def monitor(p: Parsed) -> int:
    """Drift of served predictions against a bundle's calibration split (or another log)."""
    import json

    from rich.console import Console

    from roadwork.monitor.drift import DriftThresholds, compare_predictions, load_predictions

    o = p.options
    th = DriftThresholds(psi=o["psi"], class_mix=o["class_mix"], abstain=o["abstain"], min_rows=o["min_rows"])
    ref, cur = p.positionals["REFERENCE"], p.positionals["CURRENT"]
    report = compare_predictions(load_predictions(ref), load_predictions(cur), thresholds=th)
    Console().print(_drift_table(report, f"drift: {cur} vs {ref}"))
    if o["out"] is not None:
        Path(o["out"]).write_text(json.dumps(report, indent=2))
        _print(f"report: {o['out']}")
    _print(
        "DRIFT: the served traffic no longer looks like the calibration split; the guarantees may not hold."
        if report["drift"]
        else "no drift beyond the thresholds."
    )
    return 0


def audit(p: Parsed) -> int:
    """Likely label errors of a run's calibration and test splits (cleanlab), and the flip rate."""
    from rich.console import Console
    from rich.table import Table

    from roadwork.field.audit import MATERIAL_FLIP_RATE
    from roadwork.pipeline.audit import audit_run

    run = Path(p.positionals["RUN"])
    result = audit_run(run, top=p.options["top"])
    issues = result["issues"]
    out = run / "audit"
    table = Table(
        title=f"label audit: {len(issues)} likely errors in {result['n']} calibration + test labels"
    )
    for col in ("id", "given", "suggested", "score"):
        table.add_column(col)
    for row in result["issues"][: p.options["top"]]:
        table.add_row(row["id"], row["given"], row["suggested"], f"{row['score']:.3f}")
    Console().print(table)
    rates = ", ".join(f"{c} {100 * r:.1f} %" for c, r in result["flip_rate_per_class"].items())
    _print(f"estimated flip rate {100 * result['flip_rate']:.1f} % (given label per class: {rates})")
    if result["suggested_label_flip_rate"] is not None:
        _print(
            f"warning: the estimated flip rate is over {100 * MATERIAL_FLIP_RATE:.0f} %: the conformal guarantee "
            "assumes clean calibration labels. Fix the labels in label_issues.csv, or rerun with "
            f"conformal.label_flip_rate={result['suggested_label_flip_rate']}."
        )
    also = f"; the report's Label audit section: {result['report']}" if "report" in result else ""
    _print(f"wrote {out / 'label_issues.csv'} and {out / 'audit.json'}{also}")
    return 0


def recertify(p: Parsed) -> int:
    """A new bundle version whose conformal threshold, abstention and miss-rate control are refitted on freshly
    labelled images or the field store's labelled answers."""
    from rich.console import Console
    from rich.table import Table

    o = p.options
    text = p.positionals["SOURCE"]
    if text.startswith(("postgresql://", "postgres://")) or Path(text).suffix.lower() in _STORE_SUFFIXES:
        from roadwork.field.recertify import recertify_from_store

        report = recertify_from_store(
            p.positionals["BUNDLE"],
            text,
            since=_since(o["since"]),
            audit_only=o["labels"] == "audit",
            out=o["out"],
            key=o["key"],
        )
        data_report = None
    else:
        report, data_report = _recertify_images(p.positionals["BUNDLE"], Path(text), o)
    table = Table(
        title=f"recertified on {report['fit_rows']} images, checked on {report['check_rows']} others"
    )
    for col in ("policy", "policy_version", "coverage", "answered", "error on answered"):
        table.add_column(col)
    for name in ("old", "new"):
        f = report[name]["check"]
        risk = "-" if f["selective_risk"] is None else f"{f['selective_risk']:.4f}"
        table.add_row(
            name, report[name]["policy_version"], f"{f['coverage']:.4f}", f"{f['answered']:.4f}", risk
        )
    Console().print(table)
    if data_report is not None and data_report.skipped:
        _print(f"{len(data_report.skipped)} file(s) of SOURCE were unusable and skipped")
    _print(f"new version: {report['bundle']} (policy_version {report['new']['policy_version']})")
    return 0


_STORE_SUFFIXES = (".db", ".sqlite", ".sqlite3")


def label_next(p: Parsed) -> int:
    """What to label next from a field store, as a CSV and a table."""
    import pandas as pd
    from rich.console import Console
    from rich.table import Table

    from roadwork.field.queue import label_queue
    from roadwork.field.store import open_store

    o = p.options
    where = p.positionals["STORE"]
    if o["n"] < 1:
        raise usage_error(p.command, f"n={o['n']} lists nothing; pass n=1 or more.")
    if not where.startswith(("postgresql://", "postgres://")) and not Path(where).is_file():
        raise InputError(f"STORE={where!r} is not a field store file; pass the server's feedback_db.")
    if o["images"] is not None and not Path(o["images"]).is_dir():
        raise InputError(f"images={o['images']!r} is not a folder; pass the server's log_images folder.")
    out = Path(o["out"])
    if not out.parent.is_dir():
        raise InputError(f"out={o['out']!r}: the folder {str(out.parent)!r} does not exist; create it first.")
    store = open_store(where)
    try:
        rows = label_queue(store, o["n"], images=o["images"])
    finally:
        store.close()
    tmp = out.with_name(f".{out.name}.tmp")
    pd.DataFrame(rows).to_csv(tmp, index=False)
    tmp.replace(out)
    table = Table(title=f"what to label next: {len(rows)} answers")
    for col in ("rank", "id", "reason", "served", "probability", "abstain"):
        table.add_column(col)
    for r in rows[:20]:
        table.add_row(*(str(r[c]) for c in ("rank", "id", "reason", "served", "probability", "abstain")))
    Console().print(table)
    reasons = pd.Series([r["reason"] for r in rows], dtype=str).value_counts().to_dict()
    _print(f"wrote {out} ({', '.join(f'{k}: {v}' for k, v in reasons.items()) or 'nothing unlabelled'})")
    return 0


def _since(text: str | None) -> float | None:
    """``since=`` as a UNIX time: an ISO date or date-time (UTC when no zone is given)."""
    if text is None:
        return None
    import datetime as dt

    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise InputError(
            f"since={text!r} is not a date; use an ISO date or date-time, e.g. since=2026-12-01."
        ) from None
    return (when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)).timestamp()


def _recertify_images(bundle: str, source: Path, o: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """``roadwork recertify`` from an image folder or manifest."""
    from roadwork.config import DataConfig
    from roadwork.data.sources import CORE_COLUMNS, build_dataset
    from roadwork.field.recertify import recertify as run_recertify

    if not (source.is_dir() or (source.suffix.lower() in (".csv", ".parquet") and source.is_file())):
        raise InputError(
            f"SOURCE={str(source)!r} is not a folder of labelled images (one subfolder per class), a "
            ".csv/.parquet manifest with 'path' and 'label' columns, nor a field store (.db file or "
            "postgresql:// URL); pass one of those."
        )
    df, _classes, data_report = build_dataset(DataConfig(source=str(source), min_per_class=2))
    slices = {c: df[c].astype(str).tolist() for c in df.columns if c not in CORE_COLUMNS}
    report = run_recertify(
        bundle,
        df["path"].tolist(),
        df["label"].tolist(),
        out=o["out"],
        key=o["key"],
        slices=slices or None,
    )
    return report, data_report


def sweep(p: Parsed) -> int:
    """Hyper-parameter search: Optuna locally, or Ray Tune."""
    import json

    from roadwork.config import load_config
    from roadwork.scale.sweep import load_space, run_sweep, run_sweep_ray

    o = p.options
    cfg = load_config(p.config, p.overrides)
    search = run_sweep_ray if o["engine"] == "ray" else run_sweep
    res = search(
        cfg, load_space(o["space"], cfg), trials=o["trials"], metric=o["metric"], direction=o["direction"]
    )
    for row in res["trials"]:
        _print(json.dumps(row, default=str))
    _print(f"best: {res['best']['value']:.4f} {res['best']['params']}")
    _print(f"re-run it: roadwork run {res['dir']}/best.yaml")
    return 0


def dvc(p: Parsed) -> int:
    """Write dvc.yaml and roadwork.yaml: every stage as a DVC stage."""
    import yaml

    from roadwork.config import dump_config, load_config
    from roadwork.pipeline.dvc import dvc_stages

    out = Path(p.options["out"])
    cfg = load_config(p.config, p.overrides)
    out.mkdir(parents=True, exist_ok=True)
    (out / "roadwork.yaml").write_text(dump_config(cfg))
    spec = dvc_stages(cfg, base=out)
    (out / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    _print(
        f"wrote {out / 'dvc.yaml'} ({len(spec['stages'])} stages) and {out / 'roadwork.yaml'}; run: dvc repro"
    )
    return 0
