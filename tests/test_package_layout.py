"""The package's modules import each other without cycles, counting imports inside functions.

A cycle (once: the ops and the oneDNN loader importing each other) means two modules cannot be
understood, tested or replaced one at a time; the kernel registry in metalearn/kernels/registry.py exists
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
    assert {
        "metalearn.kernels.ops",
        "metalearn.kernels.registry",
        "metalearn.kernels.onednn",
    } <= set(graph)
    assert find_cycle(graph) == []


def test_ops_and_the_onednn_loader_meet_only_in_the_kernel_registry() -> None:
    graph = import_graph()
    assert "metalearn.kernels.registry" in graph["metalearn.kernels.ops"]
    assert "metalearn.kernels.registry" in graph["metalearn.kernels.onednn"]
    assert "metalearn.kernels.onednn" not in graph["metalearn.kernels.ops"]
    assert "metalearn.kernels.ops" not in graph["metalearn.kernels.onednn"]
    assert not graph["metalearn.kernels.registry"]


# The sub-packages in the order of docs/design.md's data flow; each imports only from those
# before it (and from the shared modules at the top of metalearn/).
LAYERS = ("data", "kernels", "nets", "learning", "audit", "runs", "rl", "training", "service")
SHARED = {"metalearn", "errors", "fileio", "metrics", "runtime"}
# A seed-style .pkl checkpoint names no network: its reader validates the run's config.json
# with train.py's own checks to find out which network the arrays belong to.
ALLOWED_UPWARD = {("metalearn.runs.checkpoint", "metalearn.training.config")}


def sub_package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "metalearn"


def test_sub_packages_import_only_earlier_layers() -> None:
    graph = import_graph()
    found = {sub_package(module) for module in graph} - SHARED
    assert found == set(LAYERS), "a sub-package is missing from LAYERS (or LAYERS is stale)"
    rank = {name: index for index, name in enumerate(LAYERS)}
    upward = {
        (module, dependency)
        for module, dependencies in graph.items()
        for dependency in dependencies
        if sub_package(module) in rank
        and sub_package(dependency) in rank
        and rank[sub_package(dependency)] > rank[sub_package(module)]
    }
    assert upward == ALLOWED_UPWARD
