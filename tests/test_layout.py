"""The package layout: no import cycle in src/, between modules or between the subpackages.

The import graph is read from the source with ``ast`` (nothing is imported): an edge from a module to every
``reasoning_rl`` module it imports anywhere in the file, at the top, inside a function (a deferred import) or under
``TYPE_CHECKING``, since each of these is a dependency a reader has to follow. ``from package import name`` is an edge
to ``package.name`` when that is a module, else to the package itself (its ``__init__``).

The subpackages are layered (config < tasks < run < training < models, rollout < scoring < algos < launch < report):
the second test collapses every module into its top-level part of ``reasoning_rl`` and checks that graph has no
cycle either, so a subpackage never needs one that needs it.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "reasoning_rl"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the reasoning_rl modules it imports."""
    modules = {module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolve against this module's package
                    base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:
                    targets.add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None (depth-first search, white/grey/black)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def part(module: str) -> str:
    """The top-level part of reasoning_rl a module belongs to: reasoning_rl.rollout.native -> rollout."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_find_cycle_finds_one_and_only_one():
    # a -> b -> c -> a is a cycle; a -> b, a -> c, b -> c (a diamond's half) is not
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_deferred_and_type_checking_imports():
    graph = import_graph()
    # launch/app.py imports the pipeline inside a function (torch after validation); algos/context.py names the ORM
    # under TYPE_CHECKING only: both are edges
    assert "reasoning_rl.launch.pipeline" in graph["reasoning_rl.launch.app"]
    assert "reasoning_rl.models.outcome_reward" in graph["reasoning_rl.algos.context"]


def test_no_import_cycle_between_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_import_cycle_between_subpackages():
    graph: dict[str, set[str]] = {}
    for module, targets in import_graph().items():
        graph.setdefault(part(module), set()).update(part(t) for t in targets if part(t) != part(module))
    cycle = find_cycle(graph)
    assert cycle is None, "subpackages import each other: " + " -> ".join(cycle)
