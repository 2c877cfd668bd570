"""The layout's rules, checked on the source: no import cycles, short step files, and
Prefect only in flows/."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGES = ("steps", "flows")
MAX_STEP_LINES = 400


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, Path]:
    return {
        _module_name(path): path
        for package in PACKAGES
        for path in sorted((REPO / package).rglob("*.py"))
    }


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The project modules one file imports, at any depth of the file (function-level too);
    `from a.b import c` counts as a.b.c when that is a module, else as a.b."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                found.add(name if name in modules else node.module)
    return found & modules


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the modules along it, or None (depth-first search)."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], _ = "open", stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return [*stack[stack.index(target) :], target]
            if target not in state and (found := visit(target)):
                return found
        state[node], _ = "done", stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_steps_and_flows_have_no_import_cycle():
    sources = _sources()
    modules = set(sources)
    graph = {name: _imports(path, modules) - {name} for name, path in sources.items()}
    # a package's __init__ is imported with each of its modules, but ours import nothing
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_file_in_steps_is_over_400_lines():
    long = {
        str(path.relative_to(REPO)): lines
        for path in (REPO / "steps").rglob("*.py")
        if (lines := len(path.read_text().splitlines())) > MAX_STEP_LINES
    }
    assert not long, long


def test_only_flows_imports_prefect():
    importers = {
        str(path.relative_to(REPO))
        for path in (REPO / "steps").rglob("*.py")
        if "prefect" in {m.split(".")[0] for m in _top_level_imports(path)}
    }
    assert not importers, importers


def _top_level_imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names
