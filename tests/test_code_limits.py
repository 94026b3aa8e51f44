"""Limits that keep the package's modules small enough to hold in mind: no module over 600
lines, no class over 25 methods, no import cycle among the package's modules at run time.

An import inside a function counts (it runs when the function does); one under
``if TYPE_CHECKING:`` does not. The checks parse the sources with ``ast``; the tests at the end
run them on a small package built to break each rule, so a checker that stopped seeing
violations would fail here too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import mtlsam_ext

MAX_MODULE_LINES = 600
MAX_CLASS_METHODS = 25


def _modules(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file under ``root``."""
    mods = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports at run time (anywhere but under TYPE_CHECKING)."""
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()

    def known(dotted: str) -> str | None:
        while dotted and dotted not in mods:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                continue
            if isinstance(child, ast.Import):
                found.update(m for a in child.names if (m := known(a.name)))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                    pkg = pkg[:len(pkg) - (child.level - 1)]
                    base = ".".join(pkg + ([base] if base else []))
                for a in child.names:
                    m = known(f"{base}.{a.name}") if f"{base}.{a.name}" in mods else known(base)
                    if m:
                        found.add(m)
            visit(child)

    visit(ast.parse(path.read_text()))
    found.discard(name)
    return found


def cycles(mods: dict[str, Path]) -> list[list[str]]:
    """The import cycles among ``mods`` (strongly connected components of more than one
    module, Tarjan's algorithm)."""
    graph = {m: _imports(m, p, mods) for m, p in mods.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
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

    for v in graph:
        if v not in index:
            connect(v)
    return out


def long_modules(mods: dict[str, Path]) -> list[tuple[str, int]]:
    return [(m, n) for m, p in mods.items()
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES]


def large_classes(mods: dict[str, Path]) -> list[tuple[str, int]]:
    out = []
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ClassDef):
                n = sum(isinstance(b, (ast.FunctionDef, ast.AsyncFunctionDef))
                        for b in node.body)
                if n > MAX_CLASS_METHODS:
                    out.append((f"{m}.{node.name}", n))
    return out


PACKAGE = _modules(Path(mtlsam_ext.__file__).parent, "mtlsam_ext")


def test_no_module_over_600_lines():
    assert long_modules(PACKAGE) == []


def test_no_class_over_25_methods():
    assert large_classes(PACKAGE) == []


def test_no_runtime_import_cycle():
    assert cycles(PACKAGE) == []


def test_the_checks_see_each_kind_of_violation(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub import b\n")
    # a -> b at module level, b -> a inside a function: a cycle at run time
    (pkg / "sub" / "a.py").write_text("from pkg.sub.b import f\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from pkg.sub import a\n    return a\n")
    # c -> d only under TYPE_CHECKING, d -> c at run time: no cycle
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                              "    from pkg import d\n")
    (pkg / "d.py").write_text("from . import c\n" + "x = 1\n" * MAX_MODULE_LINES)
    methods = "".join(f"    def m{i}(self):\n        pass\n" for i in range(MAX_CLASS_METHODS + 1))
    (pkg / "e.py").write_text(f"class Big:\n{methods}\nclass Small:\n    def m(self):\n"
                              "        pass\n")
    mods = _modules(pkg, "pkg")
    assert cycles(mods) == [["pkg.sub.a", "pkg.sub.b"]]
    assert long_modules(mods) == [("pkg.d", MAX_MODULE_LINES + 1)]
    assert large_classes(mods) == [("pkg.e.Big", MAX_CLASS_METHODS + 1)]


@pytest.mark.parametrize("name", ["mtlsam_ext.optim.mtlsam", "mtlsam_ext.optim.steps.gl"])
def test_the_import_graph_is_read(name):
    """The graph the cycle test walks is not empty: the optimizer and a step import the
    collaborators they call."""
    assert _imports(name, PACKAGE[name], PACKAGE)
