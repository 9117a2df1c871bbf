"""Imports flow one way: ``cli.py`` → ``l3m_lightning`` → ``constraints``, with no cycle inside ``l3m_lightning``.

Every module's imports are read with ``ast``, the ones inside functions too (a lazy import is still
a dependency), so a loop or an upward import fails here rather than as a partial-import error in
whichever order a user happens to import things.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("constraints", "l3m_lightning")
#: Top-level packages in the order of the layers, lowest first: a module may import its own layer and those below.
LAYERS = ("constraints", "l3m_lightning", "cli")


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project's packages and the top-level cli.py."""
    found = {"cli": ROOT / "cli.py"}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` names (relative imports resolved against ``module``)."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if path.name != "__init__.py":
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path) -> list[tuple[str, int]]:
    """``(imported module, line)`` for every import in the file, at any depth; ``from pkg import sub`` names ``pkg.sub`` when it is a module."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, path, node)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.append((sub if sub in MODULES else target, node.lineno))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            out.append((node.args[0].value, node.lineno))  # importlib.import_module("a.b") with a literal name
    return out


def _layer(name: str) -> int | None:
    top = name.split(".")[0]
    return LAYERS.index(top) if top in LAYERS else None


def test_the_module_list_is_complete():
    assert {"cli", "constraints", "constraints.reward_model", "l3m_lightning", "l3m_lightning.cli", "l3m_lightning.module"} <= set(MODULES)


def test_imports_only_go_down_the_layers():
    """constraints imports nothing of l3m_lightning or cli; l3m_lightning imports nothing of cli."""
    upward = []
    for module, path in MODULES.items():
        own = _layer(module)
        for target, line in imports_of(module, path):
            layer = _layer(target)
            if layer is not None and layer > own:
                upward.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not upward, "imports must flow cli -> l3m_lightning -> constraints:\n" + "\n".join(upward)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module, or a module importing itself (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles():
    """No set of project modules imports itself round, counting imports inside functions."""
    graph = {module: {t for t, _ in imports_of(module, path) if t in MODULES and t != module} for module, path in MODULES.items()}
    cycles = _cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
