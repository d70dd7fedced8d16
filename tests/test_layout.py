"""The package's architecture holds: no import cycles, no private names imported across modules,
and each layer imports only the layers below it (imports anywhere in a module count, including
the ones inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "ddetr_cli"

# layer -> the layers it may import (besides itself)
ALLOWED: dict[str, set[str]] = {
    "assets": set(),  # where csrc/ and weights/ are (installed package data or the checkout)
    "files": {"assets"},
    "formats": {"files", "assets"},
    "data": {"formats", "files", "assets"},
    "ops": {"assets"},
    "models": {"ops", "formats", "files", "assets"},
    "weights": {"models", "ops", "formats", "files", "assets"},
    "engine": {"weights", "models", "ops", "data", "formats", "files", "assets"},
    "cli": {"engine", "weights", "models", "ops", "data", "formats", "files", "assets", "__init__"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


KNOWN = {module_name(p) for p in PKG.rglob("*.py")}


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, imported names, line) for every import of the package in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "ddetr_cli"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "ddetr_cli":
                continue
            names = [a.name for a in node.names]
            known = KNOWN
            # `from ddetr_cli.pkg import module` imports a module, not a name
            mods = [f"{mod}.{n}" for n in names if f"{mod}.{n}" in known]
            out += [(m, [], node.lineno) for m in mods]
            rest = [n for n in names if f"{mod}.{n}" not in known]
            if rest or not mods:
                out.append((mod, rest, node.lineno))
    return out


def graph() -> dict[str, list[tuple[str, list[str], int]]]:
    return {module_name(p): imports(p) for p in sorted(PKG.rglob("*.py"))}


def layer(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_the_checker_sees_imports():
    g = graph()
    assert len(g) > 30
    assert ("ddetr_cli.formats.labels", ["LabelTable"]) in [(m, n) for m, n, _ in g["ddetr_cli.models.config"]]
    assert "ddetr_cli.models.deformable_detr" in [m for m, _, _ in g["ddetr_cli.models.build"]]


def test_no_import_cycles():
    g = {m: sorted({i for i, _, _ in deps if i in KNOWN and i != m}) for m, deps in graph().items()}
    # the package's __init__ files import nothing heavy; a submodule "importing" its parent
    # package is how Python resolves it, not a dependency
    g = {m: [d for d in deps if not m.startswith(d + ".")] for m, deps in g.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in g.get(m, []):
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in g:
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_private_names_across_modules():
    bad = [f"{m} imports {n} from {i} (line {line})" for m, deps in graph().items() for i, names, line in deps
           for n in names if n.startswith("_") and not n.startswith("__") and i != m]
    assert not bad, "\n".join(bad)


def test_layers_import_only_downwards():
    bad = []
    for m, deps in graph().items():
        own = layer(m)
        if own not in ALLOWED:
            continue
        for i, _, line in deps:
            other = layer(i)
            if other != own and other not in ALLOWED[own]:
                bad.append(f"{m} (layer {own}) imports {i} (layer {other}), line {line}")
    assert not bad, "\n".join(bad)
