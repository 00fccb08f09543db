"""The package's import graph: no module of `ipt_ds` imports, through any chain, a module that imports it back, and
none imports `pretrain` (the separate stage that uses `ipt_ds`, never the reverse).

The graph is read from the source with `ast`, without importing anything. Every import that can run is an edge:
at module level, where a cycle can meet a half-initialised module at import time, and inside functions too. A
function-level import defers loading (deepspeed, transformers) but is still a dependency: a circle through one ties
the layers together as much as any other (the config -> generation -> checkpoint -> failures -> engine -> config
circle that this test was written against ran through `failures.exit_now`). Imports under `if TYPE_CHECKING:` never
run and are left out.
"""

from __future__ import annotations

import ast
import importlib.util
import pkgutil
from pathlib import Path

import pytest

PACKAGE = "ipt_ds"
FORBIDDEN = "pretrain"


def package_modules() -> dict[str, Path]:
    """Every module of the package (a package as its __init__.py), by dotted name; nothing is imported, so that a
    cycle which breaks importing cannot hide modules from the walk."""
    modules = {}

    def walk(directory: Path, name: str) -> None:
        modules[name] = directory / "__init__.py"
        for info in pkgutil.iter_modules([str(directory)]):
            if info.ispkg:
                walk(directory / info.name, f"{name}.{info.name}")
            else:
                modules[f"{name}.{info.name}"] = directory / f"{info.name}.py"

    walk(Path(importlib.util.find_spec(PACKAGE).submodule_search_locations[0]), PACKAGE)
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def runtime_imports(body: list[ast.stmt]):
    """Every import statement in `body`, nested blocks and function bodies included, except under TYPE_CHECKING."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from runtime_imports(node.orelse)
        else:  # functions, classes, if, try/except/finally, with, for, while, match
            for block in _blocks(node):
                yield from runtime_imports(block)


def _blocks(node: ast.stmt):
    for field in ("body", "orelse", "finalbody"):
        yield getattr(node, field, [])
    for clause in [*getattr(node, "handlers", []), *getattr(node, "cases", [])]:
        yield clause.body


def imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """Dotted names of the modules that `node` imports: for `from a import b`, a.b where a.b is a module (the
    caller checks that), else a."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: from the module's package, one level up per extra dot
        parts = module.split(".") if is_package else module.split(".")[:-1]
        base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def import_graph(modules: dict[str, Path]) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module -> the package modules it imports, module -> what it imports of `pretrain`)."""
    graph, forbidden = {}, {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        graph[name], forbidden[name] = set(), set()
        for node in runtime_imports(ast.parse(path.read_text(), filename=str(path)).body):
            base, *members = names = imported(node, name, is_package)
            if isinstance(node, ast.Import):
                targets = names
            else:  # `from a import b`: the submodule a.b where there is one, else a
                targets = [member if member in modules else base for member in members]
            graph[name].update(target for target in targets if target in modules and target != name)
            forbidden[name].update(target for target in names if target.split(".")[0] == FORBIDDEN)
    return graph, forbidden


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None (depth-first search, in sorted order: reproducible)."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once every path from it is checked
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


@pytest.fixture(scope="module")
def graphs() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    return import_graph(package_modules())


@pytest.fixture(scope="module")
def graph(graphs) -> dict[str, set[str]]:
    return graphs[0]


def test_the_walk_sees_the_package_and_its_imports(graph):
    """Guards the checks below against passing on an empty or misread graph."""
    assert {"ipt_ds.loop", "ipt_ds.config", "ipt_ds.recipes", "ipt_ds.recipes.text", "ipt_ds.methods.ipt",
            "ipt_ds.data.tasks"} <= set(graph)
    assert {"ipt_ds.config", "ipt_ds.recipes", "ipt_ds.checkpoint"} <= graph["ipt_ds.loop"]
    assert "ipt_ds.recipes.text" in graph["ipt_ds.recipes.generation"]
    assert "ipt_ds.loop" in graph["ipt_ds.cli"]  # imported inside a function
    assert "ipt_ds.model" not in graph["ipt_ds.recipes.base"]  # under TYPE_CHECKING only


def test_no_import_cycle(graph):
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_find_cycle_names_the_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_ipt_ds_never_imports_pretrain(graphs):
    importers = {name: targets for name, targets in graphs[1].items() if targets}
    assert importers == {}, f"ipt_ds modules import {FORBIDDEN}/ (which uses ipt_ds, never the reverse): {importers}"
