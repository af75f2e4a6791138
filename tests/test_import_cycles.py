"""No import cycles among the service's packages, counting every import: at the top, inside
functions and under ``TYPE_CHECKING`` (a cycle hidden in a function is still two modules that
cannot be understood, or moved, one without the other)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("api", "worker", "shared", "trainq")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The project modules ``path`` imports, wherever the import statement stands."""
    name, found = module_name(path), set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in modules else base)
    return {module for module in found if module in modules and module != name}


def import_graph() -> dict[str, set[str]]:
    paths = [path for package in PACKAGES for path in (ROOT / package).rglob("*.py")]
    modules = {module_name(path) for path in paths}
    return {module_name(path): imports_of(path, modules) for path in paths}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_the_packages_import_each_other_without_cycles():
    graph = import_graph()
    assert len(graph) > 50  # the walk found the tree
    assert cycles(graph) == []


def test_the_engine_imports_no_redis_module():
    # The engine reports through callbacks; its record types come from shared.records/shared.schemas.
    # (worker.faults, which it shares with the Celery task, still names redis's errors as transient.)
    redis_modules = {"shared.jobs", "shared.workers", "shared.auth", "shared.queue", "shared.lease", "shared.quotas"}
    graph = import_graph()
    engine = {module for module in graph if module.startswith("worker.training")}
    assert {module: sorted(graph[module] & redis_modules) for module in engine if graph[module] & redis_modules} == {}
    for module in engine:
        path = ROOT / (module.replace(".", "/") + ("/__init__.py" if module == "worker.training" else ".py"))
        assert not any(
            isinstance(node, ast.Import | ast.ImportFrom) and "redis" in ((node.module or "") if isinstance(node, ast.ImportFrom) else " ".join(a.name for a in node.names))
            for node in ast.walk(ast.parse(path.read_text()))
        ), module


def test_the_walk_finds_a_cycle_hidden_in_a_function():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    source = ast.parse("def f():\n    from shared.settings import Settings\n")
    assert any(isinstance(node, ast.ImportFrom) for node in ast.walk(source))
