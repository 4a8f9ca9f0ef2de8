"""Layers point one way: graphs <- export, graphs <- runtime; the runtime never imports a command; no cycles."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import dspark

ROOT = Path(dspark.__file__).parent
COMMANDS = ("dspark.check", "dspark.cli", "dspark.bench", "dspark.demo", "dspark.serve", "dspark.train", "dspark.export")
# what each layer may not import (anything at or under these names)
FORBIDDEN = {
    "dspark.runtime": COMMANDS,
    "dspark.graphs": COMMANDS + ("dspark.runtime",),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = ROOT.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports(path: Path) -> set[str]:
    """Every dspark module ``path`` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("dspark")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dspark"):
            # 'from dspark.x import y' imports the module dspark.x.y when there is one, else names of dspark.x
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if is_module(child) else node.module)
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in ROOT.rglob("*.py")}


def under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_every_runtime_module_imports():
    for path in sorted((ROOT / "runtime").glob("*.py")):
        importlib.import_module(module_name(path))


def test_layers_point_one_way():
    edges = graph()
    assert "dspark.runtime.generate" in edges and "dspark.graphs.decoder" in edges  # the walk found the package
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in edges.items()
        for layer, forbidden in FORBIDDEN.items() if under(module, layer)
        for target in targets for f in forbidden if under(target, f)
    )
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    edges = graph()
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if nxt == node:
                continue
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)
