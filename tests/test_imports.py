"""The package's import graph, read from the source (AST): no import cycles, and the leaves (report, demo,
quickstart) imported by nothing else in dreamtune. Imports inside functions count too: a lazy import
still ties the two modules together."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "dreamtune"
LEAVES = {"dreamtune.report", "dreamtune.report_inputs", "dreamtune.report_render", "dreamtune.demo", "dreamtune.quickstart"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the dreamtune modules it imports (`from pkg import sub` counts as importing pkg.sub)."""
    modules = {module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in modules)
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "dreamtune":
                subs = {f"{node.module}.{a.name}" for a in node.names} & set(modules)
                named_only_submodules = subs and len(subs) == len(node.names)
                deps.update(subs if named_only_submodules else subs | ({node.module} & set(modules)))
        graph[name] = deps - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_the_graph_sees_imports():
    """The reader finds real edges (the test below would pass vacuously on an empty graph)."""
    g = import_graph()
    assert "dreamtune.sampling_core" in g["dreamtune.fast_sampling"]
    assert "dreamtune.engine" in g["dreamtune.generate_cli"]
    assert "dreamtune.tasks.math500" in g["dreamtune.tasks.competition"]


def test_no_import_cycles():
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()))


def test_a_planted_cycle_is_found():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_leaves_are_imported_by_nothing_in_the_core():
    g = import_graph()
    users = {m: sorted(n for n, deps in g.items() if m in deps and n not in LEAVES) for m in LEAVES}
    assert all(not u for u in users.values()), users
