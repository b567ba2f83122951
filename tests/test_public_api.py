from __future__ import annotations

import subprocess
import sys

import roadwork


def test_all_names_resolve():
    assert sorted(roadwork.__all__) == sorted(set(roadwork.__all__))
    for name in roadwork.__all__:
        assert getattr(roadwork, name) is not None


def test_import_pulls_in_no_torch_and_no_web_framework():
    code = (
        "import sys, roadwork, roadwork.trust, roadwork.export.bundle; "
        "print(sorted(m for m in ('torch', 'fastapi', 'starlette', 'timm') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
