"""The package's layering, read from the source: imports point downwards only, and no module
imports itself back through others (docs/architecture.md, "Rules").

Every ``import`` and ``from ... import`` statement counts, also those inside functions (a lazy
upward import is still an upward dependency), except under ``if TYPE_CHECKING:``. Levels, lowest first:

    models < config < {memory, data} < {distributed, tracking} < planner < train < cli

A module may import its own package, and any package on a lower level; ``resnet_scale._version``
is importable by all.
"""

from __future__ import annotations

import ast
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "resnet_scale"

LEVELS = {
    "models": 0,
    "config": 1,
    "memory": 2,
    "data": 2,
    "distributed": 3,
    "tracking": 3,
    "planner": 4,
    "train": 5,
    "cli": 6,
}
TOP = max(LEVELS.values()) + 1  # resnet_scale/__init__.py and __main__.py sit above everything
LEAVES = {"resnet_scale._version"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (ROOT / rel).with_suffix(".py").is_file() or (ROOT / rel / "__init__.py").is_file()


def imports_of(path: Path) -> set[str]:
    """The resnet_scale modules ``path`` imports (``from pkg import mod`` resolves to ``pkg.mod``)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text(), str(path))
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and ast.unparse(block.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
                   for stmt in block.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in typing_only:  # annotations only: never imported at run time
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y / from . import y
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if is_module(full) else base)
    return {m for m in found if m == "resnet_scale" or m.startswith("resnet_scale.")}


def level(module: str) -> int:
    parts = module.split(".")
    if module in LEAVES:
        return -1
    if len(parts) == 1 or parts[1] not in LEVELS:  # the package root, resnet_scale/__main__.py
        return TOP
    return LEVELS[parts[1]]


def package_of(module: str) -> str:
    return ".".join(module.split(".")[:2])


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
GRAPH = {name: imports_of(path) for name, path in MODULES.items()}


def test_every_subpackage_has_a_level():
    subpackages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert subpackages == set(LEVELS), "add the new package to LEVELS here and to docs/architecture.md"


def test_no_upward_import():
    upward = [f"{m} imports {target} ({package_of(target)} is above {package_of(m)})"
              for m, targets in GRAPH.items() for target in sorted(targets)
              if package_of(target) != package_of(m) and level(target) >= level(m)]
    assert not upward, "\n".join(upward)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` as [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for target in sorted(graph.get(m, ())):
            if target == m or target not in graph:
                continue
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in graph:
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_no_import_cycle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    """The checker itself: a function-level import and a relative import are both found."""
    src = PACKAGE / "memory" / "settings.py"
    assert "resnet_scale.memory.checkpointing" in imports_of(src)  # imported inside a function there
    assert "resnet_scale.data.imageset" in imports_of(PACKAGE / "data" / "sources.py")  # from .imageset
    assert level("resnet_scale.train.trainer") > level("resnet_scale.planner.search") > level("resnet_scale.memory")
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_models_import_only_torch():
    for name, path in MODULES.items():
        if name.startswith("resnet_scale.models"):
            tree = ast.parse(path.read_text())
            roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
            roots |= {n.module.split(".")[0] for n in ast.walk(tree)
                      if isinstance(n, ast.ImportFrom) and n.module and not n.level}
            assert roots <= {"torch", "math", "typing", "collections", "dataclasses", "__future__", "functools",
                             "resnet_scale"}, (name, roots)
            assert all(m.startswith("resnet_scale.models") for m in GRAPH[name]), (name, GRAPH[name])
