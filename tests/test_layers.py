"""Imports run downward: the layer order of docs/architecture.md, read from every module's
imports with ``ast`` (module-level and function-level alike).

The layers of ``src/attnlab``, bottom to top (a layer may import only the layers
below it; layers of the same rank are peers and import none of each other):

    0  core
    1  mechanisms
    2  nn
    3  tasks
    4  models
    5  analysis, interventions, kv, distributed
    6  bench, report
    7  cli

The package façade ``attnlab/__init__.py`` ranks with the highest layer it
imports. Inside one layer modules may import each other, but never in a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import attnlab

LAYERS = {
    "core": 0,
    "mechanisms": 1,
    "nn": 2,
    "tasks": 3,
    "models": 4,
    "analysis": 5,
    "interventions": 5,
    "kv": 5,
    "distributed": 5,
    "bench": 6,
    "report": 6,
    "cli": 7,
}
# folders under src/attnlab that hold data files, not code
DATA = {"data"}

ROOT = Path(attnlab.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = ["attnlab", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imported_modules(name: str, path: Path) -> set[str]:
    """Every ``attnlab`` module ``name`` imports, anywhere in its body, resolved to the most
    specific module that exists (``from attnlab.models import capture`` is the module
    ``attnlab.models.capture`` when it exists, else the package ``attnlab.models``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "attnlab")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target.split(".")[0] != "attnlab":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in MODULES else target)
    return found


GRAPH = {name: imported_modules(name, path) for name, path in MODULES.items()}


def layer_of(name: str) -> str | None:
    """The layer a module belongs to (None for the façade ``attnlab`` itself);
    ``python -m attnlab`` (``attnlab.__main__``) is the command line's."""
    parts = name.split(".")
    if len(parts) == 1:
        return None
    return "cli" if parts[1] == "__main__" else parts[1]


def rank(name: str, seen: frozenset[str] = frozenset()) -> int:
    layer = layer_of(name)
    if layer is not None:
        return LAYERS[layer]
    # the façade ranks with the highest layer it imports
    return max((rank(m, seen | {name}) for m in GRAPH[name] if m not in seen), default=0)


def test_every_code_folder_has_a_rank():
    unranked = {layer_of(n) for n in MODULES} - set(LAYERS) - DATA - {None}
    assert not unranked, (
        f"attnlab.{', attnlab.'.join(sorted(unranked))}: give each new layer a rank in "
        "tests/test_layers.py and docs/architecture.md"
    )


@pytest.mark.parametrize("name", sorted(n for n in MODULES if layer_of(n) is not None))
def test_imports_run_downward(name):
    mine = layer_of(name)
    wrong = []
    for target in sorted(GRAPH[name]):
        theirs = layer_of(target)
        if theirs == mine:
            continue
        if rank(target) >= LAYERS[mine]:
            wrong.append(f"{target} (rank {rank(target)})")
    assert not wrong, (
        f"{name} (layer {mine}, rank {LAYERS[mine]}) imports {', '.join(wrong)}: "
        "a layer imports only the layers below it"
    )


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle among the modules of ``graph``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycles_between_modules():
    # packages' __init__ files re-export their modules; the cycles that matter are
    # between modules that need each other's code
    modules = {n for n, p in MODULES.items() if p.name != "__init__.py"}
    graph = {n: {m for m in GRAPH[n] if m in modules} for n in modules}
    cycle = _cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    """The reader finds an import hidden in a function and resolves relative imports."""
    source = tmp_path / "probe.py"
    source.write_text(
        "from .swap import hooked\n"
        "def f():\n"
        "    from attnlab.analysis.base import Analysis\n"
        "    import attnlab.interventions\n"
    )
    found = imported_modules("attnlab.models.probe", source)
    assert found == {"attnlab.models.swap", "attnlab.analysis.base", "attnlab.interventions"}
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
