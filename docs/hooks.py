"""MkDocs hook: the generated reference pages are written before the build reads the docs, so a plain
``mkdocs build`` (or ``mkdocs serve``) works on a clean clone; ``make docs`` runs the same generator."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

GENERATOR = Path(__file__).resolve().with_name("gen_reference.py")


def on_pre_build(config: Any) -> None:
    """Write ``reference/generated/`` under the docs folder when it is missing (never over a fresh one)."""
    out = Path(config["docs_dir"]) / "reference" / "generated"
    if (out / "cli.md").is_file() and (out / "http.md").is_file():
        return
    subprocess.run([sys.executable, str(GENERATOR), str(out)], check=True)
