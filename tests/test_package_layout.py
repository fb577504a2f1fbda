"""The package's modules import each other without cycles, counting imports inside functions.

A cycle (once: the ops and the oneDNN loader importing each other) means two modules cannot be
understood, tested or replaced one at a time; the kernel registry in metalearn/kernels.py exists
so that both sides import it instead of each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "metalearn"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """Package modules named by any import statement in the file (``from metalearn import x``
    names the module metalearn.x when there is one)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found & known


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    known = set(paths)
    return {name: imported_modules(path, known) - {name} for name, path in paths.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as [a, b, ..., a], or [] if there is none (depth-first search)."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(module: str) -> list[str]:
        state[module] = "open"
        path.append(module)
        for dependency in sorted(graph[module]):
            if state.get(dependency) == "open":
                return [*path[path.index(dependency) :], dependency]
            if dependency not in state and (cycle := visit(dependency)):
                return cycle
        state[module] = "done"
        path.pop()
        return []

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return []


def test_the_cycle_finder_sees_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_package_imports_have_no_cycle() -> None:
    graph = import_graph()
    assert {"metalearn.ops", "metalearn.kernels", "metalearn.fastconv"} <= set(graph)
    assert find_cycle(graph) == []


def test_ops_and_the_onednn_loader_meet_only_in_the_kernel_registry() -> None:
    graph = import_graph()
    assert "metalearn.kernels" in graph["metalearn.ops"]
    assert "metalearn.kernels" in graph["metalearn.fastconv"]
    assert "metalearn.fastconv" not in graph["metalearn.ops"]
    assert "metalearn.ops" not in graph["metalearn.fastconv"]
    assert not graph["metalearn.kernels"]
