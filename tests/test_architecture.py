"""The package's shape: no import cycles, the CLI on top, torch only where it is used.

Imports are read from the source (every ``import`` and ``from ... import``, also those inside
functions), so a cycle that only shows up on some code path is caught too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "dermcam"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imported_modules(path: Path) -> set[str]:
    """Every dermcam module ``path`` imports (``from pkg import mod`` counts as ``pkg.mod``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("dermcam"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dermcam"):
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in MODULES else node.module)
    return {m for m in found if m in MODULES and m != "dermcam"}


GRAPH = {name: imported_modules(path) - {name} for name, path in MODULES.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def subpackage(module: str) -> str:
    """``dermcam.store.runs`` -> ``store``; top-level modules (``dermcam.errors``) stand for themselves."""
    return module.split(".")[1] if module.count(".") else module


def test_the_module_graph_has_no_cycle() -> None:
    assert find_cycle(GRAPH) is None, " -> ".join(find_cycle(GRAPH) or [])


def test_the_subpackage_graph_has_no_cycle() -> None:
    packages: dict[str, set[str]] = {}
    for module, targets in GRAPH.items():
        packages.setdefault(subpackage(module), set()).update(
            subpackage(t) for t in targets if subpackage(t) != subpackage(module))
    assert find_cycle(packages) is None, " -> ".join(find_cycle(packages) or [])


def test_only_the_cli_imports_the_cli() -> None:
    offenders = sorted(m for m, targets in GRAPH.items()
                       if not m.startswith(("dermcam.cli", "dermcam.__main__")) and any(t.startswith("dermcam.cli") for t in targets))
    assert offenders == []


@pytest.mark.parametrize("low, high", [("data", "models"), ("data", "train"), ("data", "evaluate"),
                                       ("data", "explain"), ("models", "store"), ("store", "train"),
                                       ("store", "explain"), ("evaluate", "train"), ("evaluate", "explain"),
                                       # the shortcut audit: above evaluate and explain, below the report
                                       ("data", "audit"), ("models", "audit"), ("store", "audit"),
                                       ("evaluate", "audit"), ("explain", "audit"), ("audit", "report"),
                                       # track: above the store, below train and evaluate (dermcam.track)
                                       ("data", "track"), ("models", "track"), ("store", "track"),
                                       ("track", "train"), ("track", "evaluate"), ("track", "explain")])
def test_lower_layers_do_not_import_higher_ones(low: str, high: str) -> None:
    """The flow is image file -> data -> model -> store -> train/evaluate -> explain, never backwards."""
    offenders = sorted(f"{m} -> {t}" for m, targets in GRAPH.items() if subpackage(m) == low
                       for t in targets if subpackage(t) == high)
    assert offenders == []


AUDIT_IMAGE_MODULES = ("dermcam.audit.detectors", "dermcam.audit.perturb")


@pytest.mark.parametrize("module", AUDIT_IMAGE_MODULES)
def test_the_audit_image_functions_sit_with_data(module: str) -> None:
    """The detectors and perturbations are pure image functions: they import only ``data``, the top-level
    helpers (errors, checks) and each other, and never torch, so the engine above them can batch freely
    and a Python user can run them on any array."""
    allowed = {"data", "errors", "checks", "color"}
    offenders = sorted(t for t in GRAPH[module] if subpackage(t) not in allowed and t not in AUDIT_IMAGE_MODULES)
    assert offenders == []
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert "torch" not in imported and "timm" not in imported


def test_the_finder_sees_a_cycle() -> None:
    """The check itself works: a made-up graph with a cycle is caught."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
