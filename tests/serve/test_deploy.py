"""The files in deploy/ parse, and what they reference exists: metrics, health paths, the torch-free extra."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _exported_metrics(tiny_run) -> str:  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient

    from roadwork.serve import ServeSettings, create_app

    image = next((tiny_run[1].run_dir / "data" / "images").glob("*.jpg")).read_bytes()
    with TestClient(create_app(tiny_run[1].bundle, ServeSettings())) as c:
        assert (
            c.post("/v1/classify", content=image, headers={"content-type": "image/jpeg"}).status_code == 200
        )
        return c.get("/metrics").text


def test_every_metric_in_the_dashboard_and_the_alert_rules_is_exported(tiny_run):
    pytest.importorskip("fastapi")
    exported = set(re.findall(r"^(roadwork_[a-z_]+)", _exported_metrics(tiny_run), re.M))
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "roadwork.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    rules = yaml.safe_load((DEPLOY / "prometheus-rules.yml").read_text())
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    used = {m for e in exprs for m in re.findall(r"roadwork_[a-z_]+", e)}
    assert used and used <= exported, used - exported


def test_compose_prometheus_and_kubernetes_files_are_consistent():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert {"roadwork", "prometheus", "grafana"} <= set(compose["services"])
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    assert prom["scrape_configs"][0]["static_configs"][0]["targets"] == ["roadwork:8000"]
    docs = list(yaml.safe_load_all((DEPLOY / "k8s" / "roadwork.yaml").read_text()))
    dep = next(d for d in docs if d["kind"] == "Deployment")
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["resources"]["requests"]["cpu"]
    drain = next(float(a.split("=")[1]) for a in c["args"] if a.startswith("drain_timeout_s="))
    assert pod["terminationGracePeriodSeconds"] > drain  # drain finishes before Kubernetes kills the pod
    assert any(d["kind"] == "Service" for d in docs)


def test_the_serving_image_has_no_torch():
    docker = (DEPLOY / "Dockerfile").read_text()
    assert 'pip install ".[serve]"' in docker and "HEALTHCHECK" in docker and "/v2/health/ready" in docker
    extras = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert not any(d.startswith(("torch", "timm", "lightning")) for d in extras["serve"])
    code = "import sys, roadwork.serve, roadwork.serve.app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
