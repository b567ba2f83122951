"""The documentation: it builds with zero warnings, its Python examples run, its command lines are valid."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if "generated" not in p.parts)
PY_PAGES = [p for p in PAGES if "```python" in p.read_text()]


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def test_every_page_is_in_the_navigation():
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in PAGES:
        assert str(page.relative_to(DOCS)) in nav, f"{page} is not in mkdocs.yml's nav"


@pytest.mark.parametrize("page", PY_PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_python_examples_run(page, tmp_path):
    """All of a page's Python blocks, in order, as one script in an empty folder (the page's tiny settings)."""
    code = "\n".join(_blocks(page.read_text(), "python"))
    script = tmp_path / "example.py"
    script.write_text(code)
    env = {**os.environ, "TQDM_DISABLE": "1", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env
    )
    assert proc.returncode == 0, f"{page.name} example failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


def _command_lines() -> list[tuple[str, str]]:
    out = []
    for page in PAGES:
        for block in _blocks(page.read_text(), "bash"):
            joined = re.sub(r"\\\n\s*", " ", block)
            for line in joined.splitlines():
                line = line.split(" #")[0].strip()
                env_free = re.sub(r"^(\w+=\S+\s+)+", "", line)  # ROADWORK_API_KEY=... roadwork serve ...
                if env_free.startswith("roadwork "):
                    out.append((page.name, env_free))
    return out


_NOT_CONFIG = {
    "out",
    "frameworks",
    "space",
    "trials",
    "engine",
    "metric",
    "direction",
    "batch",
    "workers",
    "seconds",
}


def test_every_roadwork_command_line_in_the_docs_is_valid():
    """Each `roadwork ...` line names a real command, and its config overrides pass the schema (nothing runs)."""
    from roadwork.config import load_config, parse_overrides
    from roadwork.pipeline import STAGE_NAMES
    from roadwork.serve.settings import ServeSettings

    lines = _command_lines()
    assert len(lines) > 20
    configured = {"run", "demo", "compare", "sweep", "dvc", *STAGE_NAMES} - {"predict"}  # predict: a bundle
    from roadwork.cli.specs import COMMANDS

    others = {name.split()[0] for name in COMMANDS} - configured  # every other command the CLI has
    for page, line in lines:
        words = shlex.split(line)[1:]
        cmd, rest = words[0], [w for w in words[1:] if not w.startswith("--")]
        assert cmd in configured | others, f"{page}: unknown command in {line!r}"
        if cmd in configured:
            config = "demo" if cmd == "demo" else None
            if rest and "=" not in rest[0]:
                config, rest = rest[0], rest[1:]
            if config and config.endswith(".yaml") and not Path(config).exists():
                config = None  # a file the reader writes first (runs/<name>-sweep/best.yaml)
            overrides = [w for w in rest if w.split("=", 1)[0] not in _NOT_CONFIG]
            load_config(config, overrides)  # raises ConfigError naming the bad key or value
        if cmd == "serve":
            keys = parse_overrides([w for w in words[2:] if "=" in w])
            ServeSettings(**{k: v for k, v in keys.items()})


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The documentation built once, as `make docs` builds it (generated reference pages included)."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or shutil.which("mkdocs")
    assert mkdocs, "mkdocs is importable but its command is not on PATH"
    tmp_path = tmp_path_factory.mktemp("docs-build")
    docs = tmp_path / "docs"
    shutil.copytree(DOCS, docs, ignore=shutil.ignore_patterns("generated"))
    gen = subprocess.run(
        [sys.executable, str(DOCS / "gen_reference.py"), str(docs / "reference" / "generated")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert gen.returncode == 0, gen.stderr[-3000:]
    cfg = (ROOT / "mkdocs.yml").read_text().replace("docs_dir: docs", f"docs_dir: {docs}")
    cfg = cfg.replace("site_dir: site", f"site_dir: {tmp_path / 'site'}").replace(
        "paths: [src]", f"paths: [{ROOT / 'src'}]"
    )
    cfg = cfg.replace("- docs/griffe_rst.py:", f"- {DOCS / 'griffe_rst.py'}:")
    cfg = cfg.replace("- docs/hooks.py", f"- {DOCS / 'hooks.py'}")
    (tmp_path / "mkdocs.yml").write_text(cfg)
    proc = subprocess.run(
        [mkdocs, "build", "--strict", "-f", str(tmp_path / "mkdocs.yml")],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "WARNING" not in proc.stderr, proc.stderr[-4000:]
    return tmp_path / "site"


def test_docs_build_with_zero_warnings(site):
    api = (site / "reference" / "python.html").read_text()
    assert "predict_sets" in api and "TrustPolicy" in api  # mkdocstrings rendered the docstrings
    cli = (site / "reference" / "generated" / "cli.html").read_text()
    assert "conformal.label_noise" in cli and "max_queue_delay_ms" in cli
    assert "Usage: roadwork sweep" in cli and "Usage: roadwork serve" in cli  # each command's own help
    http = (site / "reference" / "generated" / "http.html").read_text()
    assert "/v1/classify" in http and "/v2/models/{name}/infer" in http


def _text(html: str) -> str:
    import html as html_lib

    return html_lib.unescape(re.sub(r"<[^>]+>", "", html))


def test_python_api_page_renders_roles_doctests_and_every_entry(site):
    api = (site / "reference" / "python.html").read_text()
    text = _text(api)
    for role in (":meth:", ":class:", ":func:", ":data:", ":mod:", ":attr:"):
        assert role not in text, role  # Sphinx roles became code spans
    assert "<blockquote" not in api  # a doctest is a code block, not nested quotes
    prompt = '<span class="gp">&gt;&gt;&gt; </span><span class="n">load_config</span>'
    assert prompt in api  # a highlighted doctest with its prompt

    def section(name: str) -> str:  # the rendered entry of one object, up to the next top-level entry
        start = api.index(f'id="{name}"')
        nxt = api.find('<div class="doc doc-object doc-class">', start + 1)
        return api[start : nxt if nxt > 0 else None]

    assert {"subset", "from_parquet", "logits", "slices"} <= set(
        re.findall(r"\w+", _text(section("roadwork.trust.Predictions")))
    )
    assert {"metrics", "report", "bundle", "stages"} <= set(
        re.findall(r"\w+", _text(section("roadwork.pipeline.RunResult")))
    )


def test_the_rst_to_markdown_extension():
    sys.path.insert(0, str(DOCS))
    try:
        from griffe_rst import rst_to_markdown
    finally:
        sys.path.remove(str(DOCS))
    text = "See :meth:`fit` and :class:`~roadwork.trust.TrustPolicy`, ``alpha``.\n\n    >>> f(1)\n    2\n\nAfter."
    assert rst_to_markdown(text) == (
        "See `fit` and `TrustPolicy`, `alpha`.\n\n    ```pycon\n    >>> f(1)\n    2\n    ```\n\nAfter."
    )


_NAV_PROBE = """<!doctype html><meta charset="utf-8"><body><iframe id="f" width="1280" height="900"></iframe>
<pre id="rw-probe"></pre><script>
const frame = document.getElementById("f"), results = [];
const load = url => new Promise(ok => { frame.onload = () => ok(); frame.src = url; });
(async () => {
  await load("index.html");
  const doc = frame.contentDocument;
  const links = [...doc.querySelectorAll("nav.md-nav--primary a.md-nav__link[href]")].map(a => a.href);
  for (const url of [...new Set(links)]) {
    await load(url);
    const d = frame.contentDocument;
    results.push({url, title: d ? d.title : null, article: !!(d && d.querySelector("article.md-content__inner h1")),
                  listing: !!(d && /Index of/.test(d.body ? d.body.innerText.slice(0, 200) : ""))});
  }
  document.getElementById("rw-probe").textContent = JSON.stringify({links: links.length, results});
})();
</script>"""


def test_site_opened_from_the_file_system_follows_every_nav_link_to_a_page(site, tmp_path):
    """As the README says: open site/index.html (file://), click through the navigation — each link a page."""
    import json

    from tests.evaluation.test_report_browser import _chromium, _run

    browser = _chromium()
    probe = site / "rw-nav-probe.html"
    probe.write_text(_NAV_PROBE)
    try:
        dom = _run(browser, tmp_path, "--allow-file-access-from-files", "--dump-dom", probe.as_uri())
    finally:
        probe.unlink()
    assert dom.returncode == 0, dom.stderr[-3000:]
    found = re.search(r'<pre id="rw-probe">(.+?)</pre>', dom.stdout, re.S)
    assert found, "the probe never finished: " + dom.stdout[-500:]
    report = json.loads(_text(found.group(1)))
    nav = (ROOT / "mkdocs.yml").read_text()
    assert len(report["results"]) >= nav.count(".md"), report  # every page in the nav was reached
    for page in report["results"]:
        assert page["url"].endswith(".html") and not page["listing"], page
        assert page["article"] and page["title"], page  # a rendered page with its heading
