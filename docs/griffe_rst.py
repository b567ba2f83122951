"""A Griffe extension for the Python API page: roadwork's docstrings are reStructuredText-flavoured (Sphinx roles
such as :meth:`fit`, ``literals``, ``>>>`` doctests), and mkdocstrings renders Markdown. Without this the page
shows the roles literally and a doctest as nested block quotes.

Loaded by mkdocs.yml (``plugins.mkdocstrings.handlers.python.options.extensions``). Only the text mkdocstrings
renders changes; the source keeps its docstrings as they are.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

# :meth:`fit`, :class:`~roadwork.trust.TrustPolicy`, :py:func:`x <a.b>`; the tilde shows the last part only
_ROLE = re.compile(
    r":(?:py:)?(?:meth|class|func|data|attr|mod|obj|exc|const|ref|doc|term):`(~?)([^`<]+?)(?:\s*<([^>]+)>)?`"
)


def _role(match: re.Match[str]) -> str:
    tilde, text, target = match.group(1), match.group(2).strip(), match.group(3)
    if target is None and tilde:
        text = text.rsplit(".", 1)[-1]
    return f"`{text}`"


def _fence_doctests(text: str) -> str:
    """Runs of ``>>>``/``...`` lines and the output lines that follow them → a fenced pycon block."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        stripped = lines[i].lstrip()
        if not stripped.startswith(">>>"):
            out.append(lines[i])
            i += 1
            continue
        indent = lines[i][: len(lines[i]) - len(stripped)]
        block = []
        while i < len(lines) and lines[i].strip():  # a doctest ends at a blank line
            block.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        out += [f"{indent}```pycon", *(f"{indent}{b}" for b in block), f"{indent}```"]
    return "\n".join(out)


def rst_to_markdown(text: str) -> str:
    """Sphinx roles → code spans; ``literal`` → `literal`; doctests → fenced pycon blocks."""
    text = _ROLE.sub(_role, text)
    text = re.sub(r"``([^`]+)``", r"`\1`", text)
    return _fence_doctests(text)


class RstToMarkdown(griffe.Extension):
    """Rewrite every loaded object's docstring from roadwork's reST habits to Markdown."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rst_to_markdown(obj.docstring.value)
