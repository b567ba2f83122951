"""Architecture rules of ``src/roadwork``, checked by walking its source with :mod:`ast` (nothing is imported).

The rules (CONTRIBUTING.md, "Rules the architecture test enforces"):

1. **Short functions.** No function or method is longer than :data:`MAX_LINES` lines (``def`` line to last line,
   nested functions included: routes written as closures count towards the function that holds them) unless a
   comment ``# long: <reason>`` sits on the ``def`` line or in the comment block just above it (above its
   decorators). The reason must be a word or more: "why this reads better in one piece".
2. **No import cycle between modules.** The graph has an edge ``a -> b`` for every import of ``b`` in ``a``'s
   source, *including imports inside functions*: a lazy import that breaks a cycle at import time still makes
   the two modules depend on each other, which is the cycle in design terms (the issue's "cycle worked around
   with wrapper functions"). Imports under ``if TYPE_CHECKING:`` are left out: they never run and only name
   types for annotations. ``from pkg import mod`` is an edge to ``pkg.mod`` (not to ``pkg/__init__``);
   ``from pkg import name`` is an edge to ``pkg`` (its ``__init__`` defines or re-exports ``name``).
3. **No cross-package import of a private name.** A ``_name`` (module or attribute) is private to the package
   that holds it, subpackages included: ``roadwork._deps`` serves every module of ``roadwork``;
   ``roadwork.trust._checks`` and ``roadwork.pipeline.stages._x`` serve only ``roadwork.trust`` and
   ``roadwork.pipeline``. Checked on ``import``/``from ... import`` and on attribute access through an imported
   module (``stages._x``). Dunder names are public.
4. **``__all__`` is true and complete.** Every name in a module's ``__all__`` exists in that module and has a
   docstring (functions and classes their own; a re-export the docstring of what it re-exports; a constant a
   string literal right after its assignment, which mkdocstrings shows); every public top-level ``def``/``class``
   of a module with ``__all__`` is listed (or renamed ``_private`` if it is not meant to be used from outside).

Each test lists its offenders as ``path:line: what``; the checker itself is tested on small fake packages.
"""

from __future__ import annotations

import ast
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "roadwork"
MAX_LINES = 80
LONG_MARKER = re.compile(r"#\s*long:\s*\w")


@dataclass
class Module:
    """One source file of the package: dotted name, path, parsed tree."""

    name: str
    path: Path
    tree: ast.Module
    lines: list[str]
    is_package: bool

    @property
    def package(self) -> str:
        """The package this module belongs to (itself for an ``__init__``)."""
        return self.name if self.is_package else self.name.rpartition(".")[0]


@dataclass
class Import:
    """One imported thing: the dotted path of what is named, where, and how."""

    importer: str
    target: str  # module (or module.attribute) the statement names
    line: int
    type_checking: bool


@dataclass
class Project:
    """Every module of one package under ``root`` (a src folder)."""

    root: Path
    package: str
    base: Path  # paths in messages are relative to this folder (the repository)
    modules: dict[str, Module] = field(default_factory=dict)

    @classmethod
    def load(cls, root: Path, package: str = PACKAGE, base: Path | None = None) -> Project:
        proj = cls(root, package, root.parent if base is None else base)
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            text = path.read_text(encoding="utf-8")
            name = ".".join(parts)
            proj.modules[name] = Module(name, path, ast.parse(text, str(path)), text.splitlines(), is_package)
        return proj

    def where(self, mod: Module, line: int) -> str:
        return f"{mod.path.relative_to(self.base)}:{line}"


# ---------------------------------------------------------------------------------------------- imports


def _type_checking_nodes(tree: ast.Module) -> set[int]:
    """ids of the import nodes inside ``if TYPE_CHECKING:`` blocks."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = (
                test.id
                if isinstance(test, ast.Name)
                else test.attr
                if isinstance(test, ast.Attribute)
                else ""
            )
            if name == "TYPE_CHECKING":
                out.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return out


def _absolute(mod: Module, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` reads from (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    base = mod.package.split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imports_of(proj: Project, mod: Module) -> list[Import]:
    """Every import of a module of the package in ``mod`` (module level and inside functions)."""
    tc = _type_checking_nodes(mod.tree)
    out: list[Import] = []
    for node in ast.walk(mod.tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == proj.package or a.name.startswith(proj.package + "."):
                    out.append(Import(mod.name, a.name, node.lineno, id(node) in tc))
        elif isinstance(node, ast.ImportFrom):
            src = _absolute(mod, node)
            if src != proj.package and not src.startswith(proj.package + "."):
                continue
            for a in node.names:
                target = src if a.name == "*" else f"{src}.{a.name}"
                out.append(Import(mod.name, target, node.lineno, id(node) in tc))
    return out


def _module_of(proj: Project, target: str) -> str:
    """The module an imported path loads: the longest prefix of ``target`` that is a module of the package."""
    parts = target.split(".")
    for i in range(len(parts), 0, -1):
        name = ".".join(parts[:i])
        if name in proj.modules:
            return name
    return target


def import_graph(proj: Project) -> dict[str, dict[str, int]]:
    """``{importer: {imported module: first line}}`` over runtime imports (TYPE_CHECKING ones left out)."""
    graph: dict[str, dict[str, int]] = {name: {} for name in proj.modules}
    for mod in proj.modules.values():
        for imp in imports_of(proj, mod):
            if imp.type_checking:
                continue
            dst = _module_of(proj, imp.target)
            if dst != mod.name and dst in proj.modules:
                graph[mod.name].setdefault(dst, imp.line)
    return graph


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module (each one a cycle or several)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def cycle_offenders(proj: Project) -> list[str]:
    graph = import_graph(proj)
    lines = []
    for comp in strongly_connected(graph):
        members = set(comp)
        edges = [
            f"{proj.where(proj.modules[a], graph[a][b])}: {a} -> {b}"
            for a in comp
            for b in sorted(graph[a])
            if b in members
        ]
        lines.append(f"cycle among {', '.join(comp)}:\n    " + "\n    ".join(edges))
    return lines


def package_graph(proj: Project) -> dict[str, dict[str, tuple[str, str, int]]]:
    """The module graph folded onto the top-level packages (``roadwork.trust``, ``roadwork.cli``, ...; a
    top-level module such as ``roadwork.errors`` is its own node): ``{a: {b: (one module edge a -> b)}}``."""

    def top(name: str) -> str:
        return ".".join(name.split(".")[:2])

    graph: dict[str, dict[str, tuple[str, str, int]]] = {top(m): {} for m in proj.modules}
    for a, targets in import_graph(proj).items():
        for b, line in targets.items():
            if top(a) != top(b):
                graph[top(a)].setdefault(top(b), (a, b, line))
    return graph


def package_cycle_offenders(proj: Project) -> list[str]:
    graph = package_graph(proj)
    lines = []
    for comp in strongly_connected({a: dict.fromkeys(bs, 0) for a, bs in graph.items()}):
        members = set(comp)
        edges = [
            f"{proj.where(proj.modules[m], line)}: {m} -> {t}"
            for a in comp
            for b, (m, t, line) in sorted(graph[a].items())
            if b in members
        ]
        lines.append(f"package cycle among {', '.join(comp)}:\n    " + "\n    ".join(edges))
    return lines


def _private_scope(proj: Project, target: str) -> str | None:
    """The package a dotted path is private to, or None when no component is ``_private``."""
    parts = target.split(".")
    for i, part in enumerate(parts):
        if part.startswith("_") and not (part.startswith("__") and part.endswith("__")):
            owner = ".".join(parts[:i])
            if owner in proj.modules and not proj.modules[owner].is_package:
                return proj.modules[owner].package  # a module's _name: private to the module's package
            return owner
    return None


def _module_aliases(proj: Project, mod: Module) -> dict[str, str]:
    """Local names bound to modules of the package by imports (``import a.b as c``, ``from a import b``)."""
    aliases: dict[str, str] = {}
    for node in ast.walk(mod.tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == proj.package:
                    if a.asname:
                        aliases[a.asname] = a.name
                    else:
                        aliases[a.name.split(".")[0]] = a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            src = _absolute(mod, node)
            for a in node.names:
                if f"{src}.{a.name}" in proj.modules:
                    aliases[a.asname or a.name] = f"{src}.{a.name}"
    return aliases


def _dotted(node: ast.expr) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return ".".join(reversed(parts))


def private_offenders(proj: Project) -> list[str]:
    out = []
    for mod in proj.modules.values():
        seen: set[tuple[int, str]] = set()
        named = [(imp.line, imp.target) for imp in imports_of(proj, mod)]
        aliases = _module_aliases(proj, mod)
        for node in ast.walk(mod.tree):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                dotted = _dotted(node)
                head = dotted.split(".")[0] if dotted else ""
                if dotted and head in aliases:
                    named.append((node.lineno, aliases[head] + dotted[len(head) :]))
        for line, target in named:
            scope = _private_scope(proj, target)
            if scope is None or mod.name == scope or mod.name.startswith(scope + "."):
                continue
            if (line, target) not in seen:
                seen.add((line, target))
                out.append(f"{proj.where(mod, line)}: {mod.name} uses {target} (private to {scope})")
    return sorted(out)


# ---------------------------------------------------------------------------------------------- functions


def _has_long_marker(mod: Module, node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
    if LONG_MARKER.search(mod.lines[node.lineno - 1]):
        return True
    i = first - 2  # the comment block right above the def (or its decorators)
    while i >= 0 and mod.lines[i].strip().startswith("#"):
        if LONG_MARKER.search(mod.lines[i]):
            return True
        i -= 1
    return False


def _qualnames(tree: ast.Module) -> dict[int, str]:
    names: dict[int, str] = {}

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                q = f"{prefix}{child.name}"
                names[id(child)] = q
                walk(child, q + ".")
            else:
                walk(child, prefix)

    walk(tree, "")
    return names


def long_function_offenders(proj: Project, max_lines: int = MAX_LINES) -> list[str]:
    out = []
    for mod in proj.modules.values():
        names = _qualnames(mod.tree)
        for node in ast.walk(mod.tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            if length > max_lines and not _has_long_marker(mod, node):
                out.append(f"{proj.where(mod, node.lineno)}: {mod.name}.{names[id(node)]} is {length} lines")
    return sorted(out)


# ---------------------------------------------------------------------------------------------- __all__


def _dunder_all(mod: Module) -> tuple[list[str], int] | None:
    for node in mod.tree.body:
        targets = (
            node.targets
            if isinstance(node, ast.Assign)
            else [node.target]
            if isinstance(node, ast.AnnAssign)
            else []
        )
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets) and node.value is not None:
            return [ast.literal_eval(e) for e in node.value.elts], node.lineno  # type: ignore[attr-defined]
    return None


def _top_level(mod: Module) -> dict[str, ast.stmt]:
    """Top-level bindings (defs, classes, assignments, imports; also those inside top-level if/try blocks)."""
    out: dict[str, ast.stmt] = {}

    def visit(body: list[ast.stmt]) -> None:
        for stmt in body:
            if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                out.setdefault(stmt.name, stmt)
            elif isinstance(stmt, ast.Assign):
                for t in stmt.targets:
                    for n in ast.walk(t):
                        if isinstance(n, ast.Name):
                            out.setdefault(n.id, stmt)
            elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                out.setdefault(stmt.target.id, stmt)
            elif isinstance(stmt, ast.Import | ast.ImportFrom):
                for a in stmt.names:
                    out.setdefault(a.asname or a.name.split(".")[0], stmt)
            elif isinstance(stmt, ast.If | ast.Try):
                visit(stmt.body)
                visit(stmt.orelse)
                if isinstance(stmt, ast.Try):
                    for h in stmt.handlers:
                        visit(h.body)

    visit(mod.tree.body)
    return out


def _attribute_docstring(mod: Module, stmt: ast.stmt) -> bool:
    body = mod.tree.body
    if stmt not in body:
        return False
    i = body.index(stmt) + 1
    return (
        i < len(body)
        and isinstance(body[i], ast.Expr)
        and isinstance(body[i].value, ast.Constant)  # type: ignore[attr-defined]
        and isinstance(body[i].value.value, str)  # type: ignore[attr-defined]
    )


def _documented(proj: Project, mod: Module, name: str, depth: int = 0) -> bool | None:
    """Whether ``name`` in ``mod`` has a docstring; None when it does not exist."""
    stmt = _top_level(mod).get(name)
    if stmt is None:
        sub = proj.modules.get(f"{mod.name}.{name}") if mod.is_package else None
        return None if sub is None else ast.get_docstring(sub.tree) is not None
    if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return ast.get_docstring(stmt) is not None
    if isinstance(stmt, ast.ImportFrom | ast.Import):
        alias = next(a for a in stmt.names if (a.asname or a.name.split(".")[0]) == name)
        if isinstance(stmt, ast.Import):
            target = proj.modules.get(alias.name)
            return True if target is None else ast.get_docstring(target.tree) is not None
        src = _absolute(mod, stmt)
        if f"{src}.{alias.name}" in proj.modules:
            return ast.get_docstring(proj.modules[f"{src}.{alias.name}"].tree) is not None
        if src not in proj.modules or depth > 10:
            return True  # a third-party re-export: its docstring is not ours to check
        return bool(_documented(proj, proj.modules[src], alias.name, depth + 1))
    return _attribute_docstring(mod, stmt)


def all_offenders(proj: Project) -> list[str]:
    out = []
    for mod in proj.modules.values():
        found = _dunder_all(mod)
        if found is None:
            continue
        names, line = found
        where = proj.where(mod, line)
        for dup in sorted({n for n in names if names.count(n) > 1}):
            out.append(f"{where}: {mod.name}.__all__ lists {dup!r} twice")
        for name in dict.fromkeys(names):
            if name.startswith("__") and name.endswith("__"):
                continue  # __version__ and the like: not documented objects
            documented = _documented(proj, mod, name)
            if documented is None:
                out.append(f"{where}: {mod.name}.__all__ names {name!r}, which the module does not define")
            elif not documented:
                stmt = _top_level(mod).get(name)
                at = proj.where(mod, stmt.lineno) if stmt is not None else where
                out.append(f"{at}: {mod.name}.{name} is in __all__ without a docstring")
        listed = set(names)
        for stmt in mod.tree.body:
            if (
                isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
                and not stmt.name.startswith("_")
                and stmt.name not in listed
            ):
                out.append(
                    f"{proj.where(mod, stmt.lineno)}: {mod.name}.{stmt.name} is public but not in __all__ "
                    "(list it, or name it _private)"
                )
    return sorted(out)


# ---------------------------------------------------------------------------------------------- the rules


@pytest.fixture(scope="module")
def project() -> Project:
    return Project.load(SRC)


def _by_place(offenders: list[str]) -> list[str]:
    """Sorted by file, then line as a number."""

    def key(s: str) -> tuple[str, int, str]:
        path, _, rest = s.partition(":")
        line, _, rest = rest.partition(":")
        return path, int(line) if line.isdigit() else 0, rest

    return sorted(offenders, key=key)


def _report(offenders: list[str], rule: str) -> str:
    return f"{len(offenders)} offender(s) of '{rule}' (see tests/test_architecture.py):\n" + "\n".join(
        _by_place(offenders)
    )


def test_the_walker_sees_the_whole_package(project: Project) -> None:
    assert {"roadwork", "roadwork.cli", "roadwork.trust.conformal", "roadwork.serve.batcher"} <= set(
        project.modules
    )
    assert len(project.modules) > 60
    graph = import_graph(project)
    assert "roadwork.errors" in graph["roadwork.trust.conformal"]


def test_no_function_is_over_80_lines_without_a_reason(project: Project) -> None:
    offenders = long_function_offenders(project)
    assert not offenders, _report(offenders, f"no function over {MAX_LINES} lines without '# long: <reason>'")


def test_no_import_cycle_between_modules(project: Project) -> None:
    offenders = cycle_offenders(project)
    assert not offenders, _report(offenders, "no import cycle (function-level imports included)")


def test_packages_depend_one_way(project: Project) -> None:
    """The layers of docs/architecture.md: no two top-level packages import each other, even through others."""
    offenders = package_cycle_offenders(project)
    assert not offenders, _report(offenders, "no import cycle between top-level packages")


def test_no_module_imports_another_packages_private_names(project: Project) -> None:
    offenders = private_offenders(project)
    assert not offenders, _report(offenders, "no cross-package import of a _private name")


def test_every_dunder_all_is_true_documented_and_complete(project: Project) -> None:
    offenders = all_offenders(project)
    assert not offenders, _report(
        offenders, "__all__ names exist, have docstrings, and list every public def"
    )


# ---------------------------------------------------------------------------------------------- the checker


def _fake(tmp_path: Path, files: dict[str, str]) -> Project:
    for rel, text in files.items():
        p = tmp_path / "pkg" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))
    return Project.load(tmp_path, "pkg", base=tmp_path)


def test_the_checker_finds_a_cycle_through_a_function_level_import_but_not_through_type_checking(
    tmp_path: Path,
) -> None:
    proj = _fake(
        tmp_path,
        {
            "__init__.py": "",
            "a/__init__.py": "",
            "a/x.py": "from pkg.b import y\n",
            "b/__init__.py": "",
            "b/y.py": "def f():\n    from pkg.a.x import g\n",
            "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.d import z\n",
            "d.py": "from pkg import c\n",
        },
    )
    offenders = cycle_offenders(proj)
    assert len(offenders) == 1
    assert "pkg.a.x, pkg.b.y" in offenders[0]
    assert (
        "pkg/a/x.py:1: pkg.a.x -> pkg.b.y" in offenders[0]
        and "pkg/b/y.py:2: pkg.b.y -> pkg.a.x" in offenders[0]
    )
    packages = package_cycle_offenders(proj)
    assert len(packages) == 1 and packages[0].startswith("package cycle among pkg.a, pkg.b:")


def test_the_checker_finds_private_imports_across_packages_only(tmp_path: Path) -> None:
    proj = _fake(
        tmp_path,
        {
            "__init__.py": "",
            "_deps.py": "",
            "t/__init__.py": "",
            "t/_checks.py": "def check(): ...\n",
            "t/m.py": "from pkg.t._checks import check\nfrom pkg import _deps\n_h = 1\n",
            "p/__init__.py": "",
            "p/s.py": "def _helper(): ...\n",
            "p/c.py": "from pkg.p.s import _helper\nfrom . import s\ns._helper()\n",
            "q.py": "from pkg.t._checks import check\nfrom pkg.t import m\nm._h\nimport pkg.p.s as s\ns._helper()\n",
        },
    )
    offenders = private_offenders(proj)
    assert offenders == [
        "pkg/q.py:1: pkg.q uses pkg.t._checks.check (private to pkg.t)",
        "pkg/q.py:3: pkg.q uses pkg.t.m._h (private to pkg.t)",
        "pkg/q.py:5: pkg.q uses pkg.p.s._helper (private to pkg.p)",
    ]


def test_the_checker_measures_functions_and_honours_the_long_marker(tmp_path: Path) -> None:
    body = "    x = 1\n" * 80
    proj = _fake(
        tmp_path,
        {
            "__init__.py": "",
            "m.py": (
                f"def short():\n{'    x = 1' + chr(10)}\n"
                f"def too_long():\n{body}\n"
                f"# long: one table of routes reads best in one place\n@staticmethod\ndef excused():\n{body}\n"
                f"def excused_inline():  # long: a generated dispatch table\n{body}\n"
                f"class C:\n    def method(self):\n{textwrap.indent(body, '    ')}"
            ),
        },
    )
    offenders = long_function_offenders(proj)
    assert offenders == ["pkg/m.py:253: pkg.m.C.method is 81 lines", "pkg/m.py:4: pkg.m.too_long is 81 lines"]


def test_the_checker_finds_untrue_undocumented_and_incomplete_dunder_all(tmp_path: Path) -> None:
    proj = _fake(
        tmp_path,
        {
            "__init__.py": '__all__ = ["good", "Const", "missing", "sub", "__version__"]\nfrom pkg.m import good\n'
            'Const = 3\n"""A documented constant."""\n',
            "sub.py": '"""A submodule."""\n',
            "m.py": '__all__ = ["good", "bare", "bare"]\ndef good():\n    """Doc."""\n'
            "def bare(): ...\nclass Forgotten: ...\ndef _private(): ...\n",
        },
    )
    assert all_offenders(proj) == [
        "pkg/__init__.py:1: pkg.__all__ names 'missing', which the module does not define",
        "pkg/m.py:1: pkg.m.__all__ lists 'bare' twice",
        "pkg/m.py:4: pkg.m.bare is in __all__ without a docstring",
        "pkg/m.py:5: pkg.m.Forgotten is public but not in __all__ (list it, or name it _private)",
    ]


if __name__ == "__main__":  # python tests/test_architecture.py: the package arrows for docs/architecture.md
    for src, targets in sorted(package_graph(Project.load(SRC)).items()):
        if targets:
            print(f"{src} -> {', '.join(sorted(targets))}")
