"""Every command's grammar (:class:`~roadwork.cli.grammar.Command`): the one place its positionals, options,
flags, help and examples are written down."""

from __future__ import annotations

from functools import partial

from roadwork.cli import commands as C
from roadwork.cli.grammar import Command, Flag, Option, Parsed, Positional

__all__ = ["COMMANDS", "STAGES", "lookup"]

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
"""The stage commands (roadwork STAGE), in graph order."""

# the gradient-boosting frameworks (roadwork.models.boosting.FRAMEWORKS; a test keeps them equal)
FRAMEWORKS = ("sklearn", "xgboost", "lightgbm", "catboost")
DEVICES = ("cpu", "cuda", "tensorrt", "auto")

_FORCE = Flag("--force", "STAGE", "rerun this stage and everything after it (repeatable)", STAGES, "stage")
_UNTIL = Flag("--until", "STAGE", "stop after this stage", STAGES, "stage")


def _serve_options() -> tuple[Option, ...]:
    """The server's settings, read from its Pydantic model (so a new setting is an option at once)."""
    from roadwork.serve.settings import ServeSettings

    return tuple(
        # text settings stay text (host=:: or host=0 are addresses, not YAML); the others are read as YAML
        Option(k, "str" if f.annotation in (str, str | None) else "yaml", f.default, f.description or "")
        for k, f in ServeSettings.model_fields.items()
        if k != "api_key"  # from ROADWORK_API_KEY only: a secret does not belong on a command line
    )


def _synthetic_options() -> tuple[Option, ...]:
    """The generator's settings (``data.synthetic.*``), read from its Pydantic model."""
    from roadwork.config import SyntheticConfig

    return tuple(
        Option(k, "yaml", f.default, f.description or "") for k, f in SyntheticConfig.model_fields.items()
    )


def _run_demo(p: Parsed) -> int:
    return C.run(p, config="demo")


def _stage_command(stage: str) -> Command:
    return Command(
        stage,
        f"run the pipeline up to the {stage} stage",
        f"Runs the pipeline up to and including the {stage!r} stage (stages whose inputs, config and code are "
        f"unchanged are cache hits). The run folder is ROOT/NAME/ (root=runs name=demo by default: "
        f"runs/demo/{stage}/).",
        (f"roadwork {stage} demo", f"roadwork {stage} demo name=fog --force {stage}"),
        partial(C.run, until=stage),
        config=True,
        overrides=True,
        flags=(_FORCE,),
    )


_PIPELINE = [
    Command(
        "demo",
        "the whole job on generated roadwork scenes",
        "The whole job (data → train → predict → calibrate → conformal → selective → policy → cascade → export "
        "→ evaluate) on generated roadwork scenes, with the demo preset. Prints a summary and the report path. "
        "Overrides are dotted config keys with YAML values.",
        (
            "roadwork demo",
            "roadwork demo train.epochs=3 data.synthetic.n=1500",
            "roadwork demo --force train",
        ),
        _run_demo,
        overrides=True,
        flags=(_FORCE,),
    ),
    Command(
        "run",
        "every stage, cached (a stage reruns when its inputs, config or code change)",
        "Runs (or reuses from cache) every stage. Overrides are dotted keys with YAML values. The run folder "
        "is ROOT/NAME/: set it with root= and name= (run takes no out=). --force STAGE reruns a stage and "
        "everything after it; --until STAGE stops after it. data.source=FOLDER with no CONFIG and no "
        "model.backbone uses the pretrained recipe (finetune-gpu with CUDA, else finetune-cpu): its weights come "
        "from the hub once; offline, pass model.weights=FILE, or model.pretrained=false for the from-scratch "
        "recipe (scratch). The first line says which; 'roadwork config show' with the same arguments prints "
        "the configuration. Images are decoded once "
        "into ROOT/cache/ (train.decode_workers processes) and reused by later runs on the same images.",
        (
            "roadwork run demo name=fog data.synthetic.seed=7 --force train",
            "roadwork run demo cascade.enabled=false   # the model alone, no cascade in front of it",
            "roadwork run data.source=path/to/folder name=mydata root=experiments",
            "roadwork run data.source=path/to/folder model.pretrained=false   # offline: the scratch recipe",
            "roadwork run finetune-gpu data.source=~/photos train.workers=4   # 4 DataLoader processes",
            "roadwork run data.source=manifest.csv conformal.alpha=0.05 selective.target_risk=0.01",
            "roadwork run demo --until predict",
        ),
        C.run,
        config=True,
        overrides=True,
        flags=(_FORCE, _UNTIL),
    ),
    Command(
        "config show",
        "print the resolved configuration",
        "Prints the resolved configuration (defaults ← CONFIG ← overrides) as YAML, exactly what 'roadwork run' "
        "would use with the same arguments (own photos with no CONFIG: the recipe it picks); a typo gets a "
        "suggestion.",
        (
            "roadwork config show demo train.lr=1e-3",
            "roadwork config show my.yaml > resolved.yaml",
            "roadwork config show data.source=photos/ model.pretrained=false",
        ),
        C.config_show,
        config=True,
        overrides=True,
    ),
    Command(
        "data synthetic",
        "write generated scenes and a manifest.csv into DIR",
        "Writes generated scenes and a manifest.csv (path, label, slice columns) into DIR. The options are "
        "the data.synthetic.* keys of a run, checked the same way.",
        (
            "roadwork data synthetic n=200 out=scenes/",
            "roadwork data synthetic n=1000 size=128 seed=3 label_noise=0.05 out=noisy/",
        ),
        C.data_synthetic,
        options=(Option("out", "str", help="the folder to write images into", required=True, metavar="DIR"),),
        extra_options=_synthetic_options,
    ),
]

_BUNDLE = [
    Command(
        "predict",
        "one JSON line per image (label, probability, set, abstain), or a resumable Parquet folder",
        "PATH is an image, a folder of images or a .csv/.parquet manifest (path + metadata columns). Without "
        "out=, prints one JSON line per image (label, probability, prediction set, abstain, stage). With "
        "out=DIR, writes a resumable Parquet folder, locally or on Ray Data (engine=ray, workers actors of "
        "batch images each). (The pipeline stage of the same name: roadwork run --until predict.)",
        (
            "roadwork predict runs/demo/export/bundle scenes/000001.jpg",
            "roadwork predict runs/demo/export/bundle scenes/manifest.csv out=preds/",
            "roadwork predict runs/demo/export/bundle scenes/ out=preds/ engine=ray workers=4",
        ),
        C.predict,
        positionals=(
            Positional("BUNDLE", "an exported bundle folder (runs/NAME/export/bundle)"),
            Positional("PATH", "images, folders of images or .csv/.parquet manifests", many=True),
        ),
        options=(
            Option(
                "out", "str", None, "write a resumable Parquet folder here instead of printing JSON lines"
            ),
            Option("engine", "str", "local", "local, or ray (Ray Data; needs out=)", ("local", "ray")),
            Option("batch", "int", 64, "images per batch (out= mode)"),
            Option("workers", "int", 2, "Ray actors (engine=ray)"),
            Option("device", "str", "cpu", "where ONNX Runtime runs", DEVICES),
            Option(
                "require_signature",
                "str",
                None,
                "an Ed25519 public key (PEM): refuse a bundle that is not signed by it (roadwork sign)",
            ),
        ),
    ),
    Command(
        "bench",
        "every runtime x precision side by side: size, accuracy, ECE, ms/img, img/s; selects the fastest",
        "Every runtime x precision of the model (ONNX Runtime fp32/int8, OpenVINO fp32/bf16, torch eager) "
        "measured side by side in one interleaved run: size, accuracy and ECE (each through its own policy) "
        "and their change vs fp32, ms/img, img/s, speed-up over torch eager. Marks the fastest variant with a "
        "certified policy within the accuracy/ECE budget and not slower than fp32; select=true records it in "
        "the bundle (runtime.json), which roadwork serve BUNDLE variant=auto serves, with its served figures on "
        "the run's test split (runtime.json and evaluate/metrics.json). Labelled images for the selection: "
        "images=, else the run's val split (never the test split it reports).",
        (
            "roadwork bench runs/demo/export/bundle",
            "roadwork bench runs/demo/export/bundle batch=32 seconds=10 threads=2",
            "roadwork bench runs/demo/export/bundle images=photos/ select=true",
        ),
        C.bench,
        positionals=(Positional("BUNDLE", "an exported bundle folder"),),
        options=(
            Option("batch", "int", 8, "images per call"),
            Option("seconds", "float", 3.0, "measuring time per variant, split over the rounds"),
            Option("rounds", "int", 5, "interleaved rounds (the best is reported)"),
            Option("threads", "int", 0, "intra-op threads; 0: the runtime's default"),
            Option(
                "images", "str", None, "labelled images: a folder (one subfolder per class) or a manifest"
            ),
            Option("max_images", "int", 512, "at most this many labelled images"),
            Option("select", "bool", False, "record the selected variant in the bundle (runtime.json)"),
            Option(
                "max_accuracy_drop", "float", None, "accuracy points below fp32 allowed (default: export's)"
            ),
            Option("max_ece_increase", "float", None, "ECE above fp32 allowed (default: export's)"),
        ),
    ),
    Command(
        "serve",
        "HTTP server: OIP v2, /v1/classify, /metrics (no torch)",
        "HTTP server (no torch): Open Inference Protocol v2, POST /v1/classify, /metrics for Prometheus. "
        "ROADWORK_API_KEY=... requires 'Authorization: Bearer ...'. A models:/ URI is fetched from the MLflow "
        "registry first (tracking_uri=, else MLFLOW_TRACKING_URI, else runs/mlflow.db).",
        (
            "roadwork serve runs/demo/export/bundle port=8000 max_batch_size=16",
            "roadwork serve runs/demo/export/bundle log_dir=logs/",
            "roadwork serve runs/demo/export/bundle require_signature=keys/release.pub device=auto",
            "roadwork serve models:/roadwork-demo/1",
        ),
        C.serve,
        positionals=(Positional("BUNDLE", "a bundle folder, or models:/NAME/VERSION"),),
        options=(
            Option("tracking_uri", "str", None, "the MLflow registry of a models:/ URI", metavar="URI"),
        ),
        extra_options=_serve_options,
    ),
    Command(
        "sign",
        "Ed25519-sign a bundle (signature.json)",
        "Checks every file of the bundle against its manifest, then writes BUNDLE/signature.json (an Ed25519 "
        "signature of the manifest, which holds every file's sha256). roadwork serve BUNDLE "
        "require_signature=KEY.pub refuses a bundle that is unsigned, signed by another key, or changed since. "
        "A key pair: roadwork sign keygen KEY.",
        (
            "roadwork sign keygen keys/release",
            "roadwork sign runs/demo/export/bundle keys/release",
            "roadwork serve runs/demo/export/bundle require_signature=keys/release.pub",
        ),
        C.sign,
        positionals=(
            Positional("BUNDLE", "the bundle folder"),
            Positional("KEY", "the Ed25519 private key (PEM)"),
        ),
    ),
    Command(
        "sign keygen",
        "write a new key pair: KEY (private, mode 0600) and KEY.pub",
        "Writes a new Ed25519 key pair: KEY (private, mode 0600) and KEY.pub (for serve require_signature=).",
        ("roadwork sign keygen keys/release",),
        C.sign_keygen,
        positionals=(Positional("KEY", "the private key file to write"),),
    ),
]

_STUDIES = [
    Command(
        "compare",
        "gradient-boosting frameworks side by side on the same image features and splits",
        "Gradient-boosting frameworks side by side on the same image features and splits (accuracy, ECE, set "
        "size, µs/row); writes ROOT/NAME/compare.json.",
        ("roadwork compare demo", "roadwork compare demo frameworks=sklearn,xgboost,lightgbm,catboost"),
        C.compare,
        config=True,
        overrides=True,
        options=(Option("frameworks", "list", None, "the frameworks to compare (default: all)", FRAMEWORKS),),
    ),
    Command(
        "monitor",
        "drift of served predictions against a bundle's calibration split",
        "Drift of served predictions (a serve log_dir or a JSON-lines file from predict) against REFERENCE: a "
        "bundle or run folder (its calibration split) or another prediction log. out= is the JSON report file.",
        (
            "roadwork monitor runs/demo/export/bundle logs/",
            "roadwork monitor runs/demo/export/bundle today.jsonl psi=0.1 out=drift.json",
        ),
        C.monitor,
        positionals=(
            Positional("REFERENCE", "a bundle or run folder, or a prediction log"),
            Positional("CURRENT", "a serve log_dir or a JSON-lines file from predict"),
        ),
        options=(
            Option("psi", "float", 0.25, "confidence PSI above this: drift"),
            Option("class_mix", "float", 0.15, "total variation of predicted-label shares above this: drift"),
            Option("abstain", "float", 0.15, "absolute change of the abstention rate above this: drift"),
            Option("min_rows", "int", 50, "a slice needs this many rows on both sides to be compared"),
            Option("out", "str", None, "write the JSON report here", metavar="FILE"),
        ),
    ),
    Command(
        "audit",
        "likely label errors in a run's calibration and test splits (cleanlab) and the label flip rate",
        "Confident learning (cleanlab) on the run's out-of-sample probabilities: the calibration and test splits "
        "through the trained model and its calibrator (the training split's own probabilities would hide its "
        "errors). Writes RUN/audit/label_issues.csv (id, path, given, suggested, score: most suspect first) and "
        "RUN/audit/audit.json (flip rate per class and overall, the confident joint), and says which "
        "conformal.label_flip_rate to rerun with when the estimated rate is material (over 1 %).",
        ("roadwork audit runs/demo", "roadwork audit runs/demo top=50"),
        C.audit,
        positionals=(
            Positional("RUN", "a run folder (runs/NAME) whose predict and calibrate stages are complete"),
        ),
        options=(
            Option("top", "int", 20, "suspects printed and shown in the report (the CSV has them all)"),
        ),
    ),
    Command(
        "label-next",
        "what to label next: the field store's unlabelled answers, ranked for a labelling team",
        "Lists the answers of a field store (feedback_db=) that have no label yet: the uniform audit sample first "
        "(oldest first: the field estimates rest on it alone), then abstained answers, answers from slice values "
        "seen rarely, and the remaining answers nearest the decision (least sure first). Writes a CSV (id, reason, "
        "served label, probability, set, time, slice values, and the captured image's path with images=, the "
        "server's log_images folder). Send the labels back with POST /v1/feedback.",
        (
            "roadwork label-next field.db",
            "roadwork label-next field.db n=500 out=to-label.csv images=captured/",
        ),
        C.label_next,
        positionals=(Positional("STORE", "the field store: a SQLite file or a postgresql:// URL"),),
        options=(
            Option("n", "int", 200, "answers to list"),
            Option("out", "str", "to-label.csv", "the CSV to write"),
            Option("images", "str", None, "the server's log_images folder: each row gets its image's path"),
        ),
    ),
    Command(
        "recertify",
        "refit a bundle's conformal sets and certified abstention on freshly labelled images: a new version",
        "SOURCE (an image folder with one subfolder per class, or a .csv/.parquet manifest with path and label "
        "columns) goes through BUNDLE exactly as it is served; or SOURCE is the field store (a .db file or a "
        "postgresql:// URL, as feedback_db=), whose labelled answers carry the probabilities served for them "
        "(labels=audit, the default: the uniform audit sample only). Three quarters of the rows (by content hash "
        "or id) refit the conformal threshold, the abstention certificate and the miss-rate control, the other "
        "quarter checks old and new side by side. "
        "Writes a new bundle version (the same model files, a new policy_version, recertify.json; signed with "
        "key=) beside the old one, which is left untouched. The calibrator, cascade gate and operating point are "
        "kept; variants are not carried over (the new version serves fp32).",
        (
            "roadwork recertify runs/demo/export/bundle labelled/",
            "roadwork recertify runs/demo/export/bundle labelled.csv out=bundles/v2 key=keys/release",
            "roadwork recertify runs/demo/export/bundle field.db since=2026-12-01",
        ),
        C.recertify,
        positionals=(
            Positional("BUNDLE", "the bundle folder to recertify"),
            Positional(
                "SOURCE",
                "freshly labelled images: a folder with a subfolder per class, a manifest, or the field store",
            ),
        ),
        options=(
            Option(
                "out", "str", None, "the new version's folder (default: BUNDLE-<policy_version> beside it)"
            ),
            Option("key", "str", None, "an Ed25519 private key (PEM): sign the new version (roadwork sign)"),
            Option("since", "str", None, "field store: only labels given since this ISO date or date-time"),
            Option(
                "labels",
                "str",
                "audit",
                "field store: audit (the uniform audit sample: exchangeable with the traffic) or all",
                ("audit", "all"),
            ),
        ),
    ),
    Command(
        "sweep",
        "Optuna search (SQLite, resumable, pruning on val loss); engine=ray: Ray Tune",
        "Hyper-parameter search. engine=local (default): Optuna (TPE, SQLite study under ROOT/NAME-sweep/, "
        "resumable, median pruning on val loss). engine=ray: Ray Tune with the same space (OptunaSearch, ASHA "
        "stopping); ray.init() first to use a cluster, a local one is started otherwise. Writes best.yaml. "
        "SPACE.yaml maps config keys to {type: float|int|choice, low, high, log, choices}.",
        (
            "roadwork sweep demo space=space.yaml trials=20",
            "roadwork sweep demo space=space.yaml trials=50 engine=ray",
            "roadwork sweep demo space=space.yaml trials=10 metric=test.accuracy direction=maximize",
        ),
        C.sweep,
        config=True,
        overrides=True,
        options=(
            Option("space", "str", help="the search space, a YAML file", required=True, metavar="SPACE.yaml"),
            Option("trials", "int", help="how many trials", required=True),
            Option("metric", "str", "val_loss", "what to optimise (val_loss, or a metrics.json key)"),
            Option("direction", "str", "minimize", "minimize or maximize", ("minimize", "maximize")),
            Option("engine", "str", "local", "local (Optuna) or ray (Ray Tune)", ("local", "ray")),
        ),
    ),
    Command(
        "dvc",
        "write dvc.yaml + roadwork.yaml: every stage as a DVC stage",
        "Writes DIR/dvc.yaml (every stage a DVC stage: its command, deps including the roadwork source, outs, "
        "params, metrics and plots) and DIR/roadwork.yaml (the resolved configuration). Then: cd DIR && dvc "
        "repro.",
        (
            "roadwork dvc demo out=. && dvc repro && dvc metrics show",
            "roadwork dvc demo train.epochs=3 out=experiments/",
        ),
        C.dvc,
        config=True,
        overrides=True,
        options=(Option("out", "str", ".", "the folder to write dvc.yaml and roadwork.yaml into"),),
    ),
]

_HELP = Command(
    "help",
    "this text, or one command's usage and examples (the same as roadwork COMMAND --help)",
    "The list of commands, or one command's usage and examples (the same as roadwork COMMAND --help).",
    ("roadwork help", "roadwork help sweep", "roadwork help data synthetic"),
    lambda p: 0,  # answered by roadwork.cli.main itself
    positionals=(
        Positional("COMMAND", "a command (two words for data synthetic, sign keygen)", required=False),
    ),
)

# a stage command's name may also start a two-word command; 'predict' is the bundle's, not the stage's
_STAGE_COMMANDS = [_stage_command(s) for s in STAGES if s != "predict"]
COMMANDS: dict[str, Command] = {c.name: c for c in [*_PIPELINE, *_BUNDLE, *_STUDIES, _HELP, *_STAGE_COMMANDS]}
"""Every command by name (two words for a sub-command); the overview lists them in this order."""


def lookup(args: list[str]) -> tuple[Command | None, list[str]]:
    """The command ``args`` start with (two words first: ``data synthetic``) and the arguments after it."""
    if len(args) >= 2 and f"{args[0]} {args[1]}" in COMMANDS:
        return COMMANDS[f"{args[0]} {args[1]}"], args[2:]
    if args and args[0] in COMMANDS:
        return COMMANDS[args[0]], args[1:]
    return None, args
