"""The seams between packages, read from the source: who may import whom, and no cycles.

Imports are read with `ast` from every module under idl/, ext/, client/ and server/ (function-level
imports included: a lazy import still ties two packages together). Each module belongs to its
package (`ringlm.server.engine`, `ringlm.client`, ...).
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("idl", "ext", "client", "server")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(("ringlm", *parts))


@cache
def modules() -> dict[str, Path]:
    found = {}
    for folder in FOLDERS:
        for path in (ROOT / folder).rglob("*.py"):
            found[module_name(path)] = path
    return found


def package_of(module: str) -> str:
    path = modules()[module]
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def walk(node: ast.AST, into_functions: bool):
    yield node
    for child in ast.iter_child_nodes(node):
        if into_functions or not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from walk(child, into_functions)


@cache
def imports_of(module: str, into_functions: bool = True) -> frozenset[str]:
    """Every module name `module` imports: anywhere in its file, or only what importing it runs."""
    names = set()
    for node in walk(ast.parse(modules()[module].read_text()), into_functions):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return frozenset(names)


def ringlm_imports(module: str, into_functions: bool = True) -> set[str]:
    return {name for name in imports_of(module, into_functions) if name in modules() and name != module}


def loaded_with(module: str) -> set[str]:
    """`module` and every ringlm module importing it loads, transitively (lazy imports left out)."""
    seen, todo = set(), [module]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo += ringlm_imports(current, into_functions=False)
    return seen


def third_party(modules_: set[str]) -> set[str]:
    """The outside packages these modules load when imported."""
    return {name.split(".")[0] for module in modules_ for name in imports_of(module, into_functions=False)
            if not name.startswith("ringlm")}


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module in modules():
        source = package_of(module)
        graph.setdefault(source, set())
        for target in ringlm_imports(module):
            if package_of(target) != source and not source.startswith(package_of(target) + "."):
                graph[source].add(package_of(target))
    return graph


def test_the_reader_sees_the_packages():
    assert {"ringlm.server.engine", "ringlm.server.model", "ringlm.client", "ringlm.ext"} <= set(package_graph())


def test_no_import_cycles_between_packages():
    graph = package_graph()

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(nxt == goal or (nxt not in seen and not seen.add(nxt) and reaches(nxt, goal, seen))
                   for nxt in graph.get(start, ()))

    cycles = [(a, b) for a in graph for b in graph[a] if reaches(b, a, set())]
    assert not cycles, f"packages that import each other: {cycles}"


def test_the_client_needs_nothing_from_the_server():
    client = [m for m in modules() if m.startswith("ringlm.client")]
    leaks = {m: sorted(t for t in ringlm_imports(m) if t.startswith("ringlm.server")) for m in client}
    assert not any(leaks.values()), leaks


def test_the_engine_package_uses_neither_gevent_nor_thrift():
    engine = {m for m in modules() if m == "ringlm.server.engine" or m.startswith("ringlm.server.engine.")}
    used = third_party(set().union(*(loaded_with(m) for m in engine)))
    assert not used & {"gevent", "thriftpy2", "thrift"}, used


@pytest.mark.parametrize("module", ["ringlm.server.engine.scheduler", "ringlm.server.engine.request",
                                    "ringlm.server.engine.slots", "ringlm.server.engine.config"])
def test_scheduling_code_needs_no_torch(module):
    """The scheduler and what it reads are plain Python (its package's __init__ aside)."""
    assert not third_party(loaded_with(module)) & {"torch", "gevent", "thriftpy2"}


def test_only_the_runner_touches_the_model_in_the_engine():
    """The engine module only hands the model to the runner it creates; torch stays in the runner."""
    engine = [m for m in modules() if m.startswith("ringlm.server.engine.")]
    touching = sorted(m for m in engine if any(t.startswith("ringlm.server.model") for t in ringlm_imports(m))
                      or "torch" in third_party({m}))
    assert touching == ["ringlm.server.engine.engine", "ringlm.server.engine.runner"]
