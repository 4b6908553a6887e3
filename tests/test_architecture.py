"""The package's shape: every module imports, imports form no cycle, and the runtime
does not import the CLI, the health report or metrics (they read Redis; they do not
feed the runtime)."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import rsaga

ROOT = Path(rsaga.__file__).parent
RUNTIME_MAY_NOT_IMPORT = ("rsaga.cli", "rsaga.health", "rsaga.metrics")


def _modules() -> dict[str, Path]:
    found = {"rsaga": ROOT / "__init__.py"}
    for info in pkgutil.walk_packages([str(ROOT)], prefix="rsaga."):
        base = ROOT.joinpath(*info.name.split(".")[1:])
        found[info.name] = base / "__init__.py" if info.ispkg else base.with_suffix(".py")
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The rsaga modules `name` imports, at module level or inside functions, but not
    under `if TYPE_CHECKING:` (annotations only)."""
    tree = ast.parse(path.read_text())
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for child in node.body for n in ast.walk(child))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            targets.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            targets.add(base)
            targets.update(f"{base}.{a.name}" for a in node.names)
    return {t for t in targets if t in known and t != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def test_every_module_imports() -> None:
    for name in _modules():
        importlib.import_module(name)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def test_imports_form_no_cycle() -> None:
    # The package's own __init__ re-exports the public API: modules never import it.
    graph = {m: deps - {"rsaga"} for m, deps in _graph().items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_runtime_does_not_import_cli_health_or_metrics() -> None:
    graph = _graph()
    for name, deps in graph.items():
        if name.startswith("rsaga.runtime"):
            bad = sorted(d for d in deps if d.startswith(RUNTIME_MAY_NOT_IMPORT))
            assert not bad, f"{name} imports {bad}"


def test_config_does_not_import_executor_or_store() -> None:
    assert not _graph()["rsaga.config"] & {"rsaga.executor", "rsaga.store"}


def test_only_the_scripts_facade_calls_a_script() -> None:
    for name, path in _modules().items():
        if name != "rsaga.scripts":
            assert 'script("' not in path.read_text(), f"{name} calls a script directly"
