"""The import graph of themis_engine has no cycle.

Every module under themis_engine/ (kernels included) is parsed; each
import inside it, at any depth (function-level imports included, `if TYPE_CHECKING:` blocks not:
they never run), is an edge to the module it loads. Importing `a.b.c` also runs the `__init__` of
`a.b`, so that is an edge too, except towards the importer's own parent packages (already loading)
and the root package, whose `__init__` gathers the public API from every domain package (an explicit
`from themis_engine import Scorer` inside the package still counts as an edge to the root).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = "themis_engine"


def _modules() -> dict[str, Path]:
    mods = {}
    base = ROOT / PKG
    for path in base.rglob("*.py"):
        parts = [PKG] + list(path.relative_to(base).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _runtime_nodes(tree: ast.AST):
    """Every node except those under `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}

    def add(src: str, target: str) -> None:
        while target and target not in mods:  # `from pkg.mod import name`: name is not a module
            target = target.rpartition(".")[0]
        if not target or target == src:
            return
        own = {src} | {src.rsplit(".", i)[0] for i in range(1, src.count(".") + 1)}
        if target not in own:
            graph[src].add(target)
        parent = target.rpartition(".")[0]
        while parent and parent != PKG:  # the parent packages' __init__ runs first
            if parent not in own and parent in mods:
                graph[src].add(parent)
            parent = parent.rpartition(".")[0]

    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        package = name if is_pkg else name.rpartition(".")[0]
        for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith(PKG):
                        add(name, alias.name)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                if not module.startswith(PKG):
                    continue
                for alias in node.names:
                    sub = f"{module}.{alias.name}"
                    add(name, sub if sub in mods else module)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph (as a path that returns to its start), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def test_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 40 and "themis_engine.scoring.scorer" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_graph_sees_function_level_imports_and_skips_type_checking():
    graph = import_graph()
    # Scorer.from_pretrained imports the offload module inside the method
    assert "themis_engine.model.offload" in graph["themis_engine.scoring.scorer"]
