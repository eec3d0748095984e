"""The package's shape, checked: what docs/ARCHITECTURE.md promises a newcomer.

- imports point one way, down the layers below (cli -> pack / train / tools -> stream -> storage,
  format, frames, video -> config, errors), and never in a circle, lazy imports included;
- one name, one thing: no top-level name is defined in two modules;
- no module over 600 lines, no function over 150.
"""

from __future__ import annotations

import ast
import collections
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "pipeline"

LAYERS = {
    "pipeline.errors": 0,
    "pipeline.shardformat": 1,
    "pipeline.durable": 1,
    "pipeline.redact": 1,
    "pipeline.progress": 1,
    "pipeline.procs": 1,
    "pipeline.config": 2,
    "pipeline.frames": 3,
    "pipeline.video": 3,
    "pipeline.device": 3,
    "pipeline.storage": 3,
    "pipeline.stream": 4,
    "pipeline.pack": 5,
    "pipeline.train": 5,
    "pipeline.tools": 6,
    "pipeline.cli": 7,
    "pipeline": 8,  # the lazy public names
    "pipeline.train.__main__": 8,  # `python -m pipeline.train`: an entry point, like the console scripts
}
"""A module may import from its own sub-package or from a lower layer, never from a higher one nor
sideways into another sub-package of its layer."""

PUBLIC_HOOKS = {"__getattr__", "__dir__", "__all__", "__version__"}


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def group(module: str) -> str:
    """The LAYERS entry a module belongs to (its longest prefix there)."""
    best = ""
    for prefix in LAYERS:
        if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best):
            best = prefix
    return best


def imports(path: Path, known: set[str]) -> set[str]:
    """The package modules `path` imports anywhere (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name.startswith("pipeline"):
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {m: imports(p, known) - {m} for m, p in mods.items()}


def test_imports_point_down_the_layers():
    wrong = []
    for module, targets in graph().items():
        mine = group(module)
        for target in targets:
            theirs = group(target)
            if target == "pipeline":
                continue  # `from pipeline import __version__`
            if LAYERS[theirs] > LAYERS[mine] or (LAYERS[theirs] == LAYERS[mine] and theirs != mine):
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports against the layers:\n" + "\n".join(sorted(wrong))


def test_no_import_circle():
    edges = graph()
    # Sub-package __init__ modules only document; importing pipeline.stream.x runs pipeline.stream
    # first, which is not a circle of ours.
    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if nxt == "pipeline":
                continue
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import circles:\n" + "\n".join(cycles)


def test_one_name_one_thing():
    where = collections.defaultdict(list)
    for module, path in modules().items():
        for node in ast.parse(path.read_text()).body:
            names = []
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names = [node.name]
            elif isinstance(node, ast.Assign):
                names = [t.id for t in node.targets if isinstance(t, ast.Name)]
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names = [node.target.id]
            for name in names:
                if name not in PUBLIC_HOOKS:
                    where[name].append(module)
    twice = {name: mods for name, mods in where.items() if len(mods) > 1}
    assert not twice, "defined in more than one module:\n" + "\n".join(
        f"{name}: {', '.join(mods)}" for name, mods in sorted(twice.items())
    )


def test_modules_and_functions_stay_short():
    long = []
    for module, path in modules().items():
        text = path.read_text()
        lines = text.count("\n") + 1
        if lines > 600:
            long.append(f"module {module}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                size = node.end_lineno - node.lineno + 1
                if size > 150:
                    long.append(f"function {module}.{node.name}: {size} lines")
    assert not long, "too long:\n" + "\n".join(long)


def test_the_architecture_map_names_every_module():
    text = (PACKAGE.parent / "docs" / "ARCHITECTURE.md").read_text()
    missing = [str(p.relative_to(PACKAGE.parent)) for p in modules().values() if p.name not in text]
    assert not missing, "docs/ARCHITECTURE.md does not map: " + ", ".join(missing)
