"""The package's layers look only down: no import runs from a lower floor of apjax into a higher one, and no
two modules import each other (directly or round a circle). Imports inside functions count too.

The floors, bottom up, are the sub-packages drawn in docs/extending.md's layout: models, data, attribution,
trainer, compress, evaluators, tasks, deploy. The top-level modules (experiment, report, ...) sit above
them all.
"""

from __future__ import annotations

import ast
from pathlib import Path

FLOORS = ("models", "data", "attribution", "trainer", "compress", "evaluators", "tasks", "deploy")
PACKAGE = Path(__file__).resolve().parent.parent / "apjax"


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module name -> the package's modules it imports (``from a.b import c`` counts ``a.b.c`` when that
    is a module, else ``a.b``), from every import statement at any depth."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    graph = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    here = name.split(".") if is_package else name.split(".")[:-1]
                    base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def floor_of(module: str) -> int | None:
    parts = module.split(".")
    return FLOORS.index(parts[1]) if len(parts) > 1 and parts[1] in FLOORS else None


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(importer, imported) pairs where the imported module's floor is above the importer's."""
    return sorted(
        (m, t)
        for m, ts in graph.items()
        for t in ts
        if floor_of(m) is not None and floor_of(t) is not None and floor_of(t) > floor_of(m)
    )


def import_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of imports (a list of modules whose last imports the first), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        path.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return path[path.index(w) :]
            if w not in state and (found := visit(w)):
                return found
        state[v] = 2
        path.pop()
        return None

    for v in sorted(graph):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_apjax_imports_only_look_down():
    graph = import_graph(PACKAGE)
    assert "apjax.trainer.state" in graph and "apjax.models.quantized" in graph  # the walk found the package
    assert upward_imports(graph) == []
    assert import_circle(graph) is None
    trainer = {m: ts for m, ts in graph.items() if m.startswith("apjax.trainer")}
    assert not any(t.startswith(("apjax.compress", "apjax.tasks")) for ts in trainer.values() for t in ts)


def test_the_checks_find_an_upward_import_and_a_circle(tmp_path):
    """A made-up package with one upward import (models -> tasks, inside a function) and one circle."""
    pkg = tmp_path / "apjax"
    for sub in ("models", "trainer", "tasks"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "models" / "net.py").write_text("def f():\n    from apjax.tasks import run\n")
    (pkg / "tasks" / "run.py").write_text("from ..trainer import loop\n")
    (pkg / "trainer" / "loop.py").write_text("import apjax.trainer.files\n")
    (pkg / "trainer" / "files.py").write_text("from apjax.trainer.loop import x\n")
    graph = import_graph(pkg)
    assert graph["apjax.tasks.run"] == {"apjax.trainer", "apjax.trainer.loop"}
    assert upward_imports(graph) == [
        ("apjax.models.net", "apjax.tasks"),
        ("apjax.models.net", "apjax.tasks.run"),
    ]
    assert sorted(import_circle(graph)) == ["apjax.trainer.files", "apjax.trainer.loop"]
