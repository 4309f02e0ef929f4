"""The layering of src/layerlab (issue 13, docs/architecture.md), read from the source with ``ast``: no import
cycles, data flowing one way (no analysis imports the CLI, demo, report or plots), no module over 500 lines."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "src" / "layerlab"
#: the presentation layer: may import everything below it, nothing below imports it
TOP = ("layerlab.cli", "layerlab.demo", "layerlab.demos", "layerlab.report", "layerlab.plots")
#: the public-name table and the package object see every module by design (lazily)
EXEMPT = ("layerlab", "layerlab._api")
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = p.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


MODULES = _modules()


def _imports(name: str) -> set[str]:
    """The layerlab modules ``name`` imports anywhere in its source (top level or inside functions)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            mod = (f"{base}.{node.module}" if node.module else base) if node.level else node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod for a in node.names]
        for t in targets:
            while t and t not in MODULES:
                t = t.rpartition(".")[0]
            if t and t != name and t.startswith("layerlab"):
                found.add(t)
    return found


GRAPH = {m: _imports(m) for m in MODULES}


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), ignoring a package's own __init__
    re-exporting its submodules (a package importing its children is not a cycle of responsibilities)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def edges(v: str) -> list[str]:
        return [w for w in GRAPH[v] if w not in EXEMPT and not w.startswith(v + ".")]

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in GRAPH:
        if v not in index and v not in EXEMPT:
            visit(v)
    return out


def test_the_graph_is_read():
    """The checks below would pass vacuously on an empty graph: the known edges must be there."""
    assert "layerlab.cli" in MODULES and "layerlab.store" in GRAPH["layerlab.sweep.run"]
    assert len(MODULES) > 40


def test_no_import_cycles():
    assert _cycles() == []


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not _under(m, TOP) and m not in EXEMPT))
def test_data_flows_one_way(module):
    """spec -> model/data -> analysis -> tables -> store -> figures / report / CLI: nothing below imports the top."""
    assert sorted(t for t in GRAPH[module] if _under(t, TOP)) == []


def test_no_module_over_500_lines():
    sizes = {m: len(p.read_text().splitlines()) for m, p in MODULES.items()}
    assert {m: n for m, n in sizes.items() if n > MAX_LINES} == {}
