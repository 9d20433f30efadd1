"""The shape of the house: commands import no command, and no module imports itself back."""
from __future__ import annotations

import ast
from pathlib import Path

import medsec

ROOT = Path(medsec.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, top_level_only: bool) -> set[str]:
    """The medsec modules ``path`` imports (``from a import b`` counts as ``a.b`` when that is a module)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.startswith("medsec")}


MODULES = {module_name(path): path for path in ROOT.rglob("*.py")}


def test_no_command_imports_another() -> None:
    commands = {name for name in MODULES if name.startswith("medsec.commands.")}
    offenders = {name: sorted(imports(MODULES[name], False) & commands) for name in commands}
    assert not {k: v for k, v in offenders.items() if v}, offenders


def test_the_library_imports_no_command() -> None:
    library = [name for name in MODULES if not name.startswith("medsec.commands") and name not in ("medsec.cli", "medsec.api")]
    offenders = {name: sorted(n for n in imports(MODULES[name], False) if n.startswith("medsec.commands"))
                 for name in library}
    assert not {k: v for k, v in offenders.items() if v}, offenders


def test_no_import_cycle_between_modules() -> None:
    graph = {name: {n for n in imports(path, True) if n in MODULES and n != name} for name, path in MODULES.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for child in graph[node]:
            if child not in index:
                visit(child)
                low[node] = min(low[node], low[child])
            elif child in stack:
                low[node] = min(low[node], index[child])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    assert not cycles, cycles
