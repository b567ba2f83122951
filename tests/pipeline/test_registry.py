"""The MLflow registry: a registered bundle loads with mlflow.pyfunc.load_model and answers as the bundle does;
models:/NAME/VERSION resolves to a bundle folder for the server."""

from __future__ import annotations

import base64
import warnings

import pandas as pd
import pytest

mlflow = pytest.importorskip("mlflow")

from roadwork.errors import ArtifactError  # noqa: E402
from roadwork.export.bundle import Bundle  # noqa: E402
from roadwork.pipeline.registry import log_bundle, resolve_bundle  # noqa: E402


def test_registered_model_gives_the_bundles_outputs(tiny_run, tmp_path):
    _, result = tiny_run
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mlflow.set_tracking_uri(uri)
        mlflow.create_experiment("registry-test", artifact_location=(tmp_path / "artifacts").as_uri())
        mlflow.set_experiment("registry-test")
        model_uri = log_bundle(result.bundle, registered_name="roadwork-tiny", tracking_uri=uri)
        assert model_uri == "models:/roadwork-tiny/1"
        loaded = mlflow.pyfunc.load_model(model_uri)
    images = sorted((result.run_dir / "data" / "images").glob("*.jpg"))[:5]
    df = pd.DataFrame({"image": [base64.b64encode(p.read_bytes()).decode() for p in images]})
    got = loaded.predict(df)
    want = Bundle.load(result.bundle).predict_paths(images)
    assert list(got["label"]) == [w["label"] for w in want]
    assert list(got["stage"]) == [w["stage"] for w in want]
    assert list(got["abstain"]) == [w["abstain"] for w in want]
    assert got["probability"].tolist() == pytest.approx([w["probability"] for w in want])
    assert list(got["prediction_set"]) == [",".join(w["prediction_set"]) for w in want]
    assert loaded.metadata.get_input_schema().input_names() == ["image"]
    folder = resolve_bundle(model_uri, tracking_uri=uri)
    assert Bundle.load(folder).classes == Bundle.load(result.bundle).classes
    with pytest.raises(ArtifactError, match="Could not fetch"):
        resolve_bundle("models:/no-such-model/7", tracking_uri=uri)


def test_pipeline_registers_the_bundle_when_asked(tiny_run, tmp_path):
    import shutil

    from roadwork.pipeline import run_pipeline

    cfg, _ = tiny_run
    shutil.copytree(cfg.run_dir, tmp_path / cfg.name)
    cfg2 = cfg.model_copy(update={"root": str(tmp_path)}, deep=True)
    cfg2.tracking.enabled, cfg2.tracking.register_as = True, "tiny-registered"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = run_pipeline(cfg2, progress=False)
    assert all(r.cached for r in res.stages) and res.registered == "models:/tiny-registered/1"
    assert Bundle.load(resolve_bundle(res.registered, tracking_uri=res.tracking_uri)).classes


def test_weights_and_biases_logging_offline(tiny_run, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    import shutil

    from roadwork.pipeline import run_pipeline

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg, _ = tiny_run
    shutil.copytree(cfg.run_dir, tmp_path / cfg.name)
    cfg2 = cfg.model_copy(update={"root": str(tmp_path)}, deep=True)
    cfg2.tracking.enabled, cfg2.tracking.wandb = True, True
    cfg2.train.epochs = 3  # retrains: per-epoch metrics reach W&B as they do MLflow
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_pipeline(cfg2, progress=False)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))
    assert wandb.run is None  # finished


def test_mlflow_client_finds_params_metrics_and_result_files(tiny_run, tmp_path):
    """As an MLflow user sees the run: settings are params, measurements metrics, result files artifacts, and
    each invocation (the stage commands of a dvc repro) a run of its own name."""
    import shutil

    from roadwork.pipeline import run_pipeline

    cfg, result = tiny_run
    client = mlflow.MlflowClient(result.tracking_uri)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exp = client.get_experiment_by_name(cfg.tracking.experiment)
        # the fixture's run: the first of that name (other tests rerun the shared tiny config, all cache hits)
        run = client.search_runs(
            [exp.experiment_id],
            filter_string=f"attributes.run_name = '{cfg.name}'",
            order_by=["attributes.start_time ASC"],
        )[0]
    params, metrics = run.data.params, run.data.metrics
    assert params["conformal.alpha"] == str(cfg.conformal.alpha) and "conformal.alpha" not in metrics
    assert params["selective.delta"] == str(cfg.selective.delta) and "selective.delta" not in metrics
    assert params["evaluate.ece_bins"] == str(cfg.evaluate.ece_bins) and "test.ece.bins" not in metrics
    assert int(params["test.n"]) == result.metrics["test"]["n"] and "test.n" not in metrics
    assert metrics["test.accuracy"] == pytest.approx(result.metrics["test"]["accuracy"])
    assert {"test.ece.calibrated", "conformal.coverage", "val_loss"} <= set(metrics)
    assert len(client.get_metric_history(run.info.run_id, "val_loss")) == cfg.train.epochs  # one per epoch

    def files(folder: str) -> set[str]:
        return {a.path for a in client.list_artifacts(run.info.run_id, folder)}

    assert {"evaluate/metrics.json", "evaluate/slices.csv"} <= files("evaluate")
    assert "data/data_report.json" in files("data") and "report/report.html" in files("report")

    shutil.copytree(cfg.run_dir, tmp_path / cfg.name)
    cfg2 = cfg.model_copy(update={"root": str(tmp_path)}, deep=True)
    cfg2.tracking.enabled = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for until in ("data", "train"):
            run_pipeline(cfg2, until=until, progress=False)
        other = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
        exp2 = other.get_experiment_by_name(cfg.tracking.experiment)
        names = [r.info.run_name for r in other.search_runs([exp2.experiment_id])]
    assert sorted(names) == [f"{cfg.name} · until data", f"{cfg.name} · until train"]
