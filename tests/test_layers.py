"""The import rule: ground floor -> tracks -> sweep -> cli, never upward, never in a cycle.

Every ``import``/``from ... import`` of mrplab in src/, at module level or inside a function, is an
edge. Ground-floor modules import only the ground floor; a track (theory with its run folder and
figures, vision) imports the ground floor and itself; sweep imports the ground floor and the tracks;
only the command line sits on top.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "mrplab"

GROUND = {"mrplab", "mrplab.errors", "mrplab.rng", "mrplab.runtime", "mrplab.config", "mrplab.stats",
          "mrplab.console", "mrplab.io", "mrplab.divergence", "mrplab.memory"}
TRACKS = {"theory": ("mrplab.theory",), "vision": ("mrplab.vision",)}
TOP = {"mrplab.cli", "mrplab.__main__"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    name = ".".join(("mrplab", *parts))
    return name.removesuffix(".__init__")


def _exists(name: str) -> bool:
    rel = Path(*name.split(".")[1:]) if "." in name else Path()
    return (SRC / rel).with_suffix(".py").exists() or (SRC / rel / "__init__.py").exists()


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        me = _module_name(path)
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.split(".")[0] == "mrplab"}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module.split(".")[0] != "mrplab":
                    continue
                for a in node.names:  # `from mrplab.x import y`: y may be a submodule or a name in x
                    sub = f"{node.module}.{a.name}"
                    deps.add(sub if _exists(sub) else node.module)
            elif isinstance(node, ast.ImportFrom) and node.level > 0:
                raise AssertionError(f"{me}: relative import; mrplab uses absolute imports")
        graph[me] = deps - {me}
    return graph


def _layer(mod: str) -> tuple[int, str]:
    if mod in GROUND:
        return 0, "ground"
    for track, prefixes in TRACKS.items():
        if any(mod == p or mod.startswith(p + ".") for p in prefixes):
            return 1, track
    if mod == "mrplab.sweep" or mod.startswith("mrplab.sweep."):
        return 2, "sweep"
    if mod in TOP:
        return 3, "cli"
    raise AssertionError(f"{mod} belongs to no layer: add it to tests/test_layers.py's plan")


def test_every_module_has_a_layer():
    for mod in import_graph():
        _layer(mod)


def test_no_module_imports_upward_or_across_tracks():
    bad = []
    for mod, deps in import_graph().items():
        level, name = _layer(mod)
        for dep in deps:
            dep_level, dep_name = _layer(dep)
            if dep_level > level or (dep_level == level and dep_name != name):
                bad.append(f"{mod} ({name}) imports {dep} ({dep_name})")
    assert not bad, "\n".join(sorted(bad))


def test_the_sweep_reaches_tracks_only_through_its_track_interface():
    """Of sweep/, only sweep/tracks.py imports a track; a track added there plugs in without special cases."""
    bad = [f"{mod} imports {dep}" for mod, deps in import_graph().items()
           if _layer(mod)[1] == "sweep" and mod != "mrplab.sweep.tracks"
           for dep in deps if _layer(dep)[1] in TRACKS]
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycles():
    graph = import_graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "\n".join(cycles)


def test_the_checker_sees_planted_violations(monkeypatch):
    """The rules are not vacuous: a ground module importing a track, and a cycle, are both reported."""
    import sys

    import pytest

    graph = import_graph()
    graph["mrplab.stats"] = graph["mrplab.stats"] | {"mrplab.theory.claims"}
    graph["mrplab.errors"] = graph["mrplab.errors"] | {"mrplab.stats"}
    monkeypatch.setattr(sys.modules[__name__], "import_graph", lambda: graph)
    with pytest.raises(AssertionError, match=r"mrplab\.stats \(ground\) imports mrplab\.theory\.claims \(theory\)"):
        test_no_module_imports_upward_or_across_tracks()
    graph["mrplab.stats"] = graph["mrplab.stats"] | {"mrplab.errors"}
    with pytest.raises(AssertionError, match="mrplab.errors -> mrplab.stats -> mrplab.errors"):
        test_no_import_cycles()
