"""The package's import structure: no circles, and no module imports a module of a higher layer.

The layers are the table in ``docs/architecture.md`` (the block after "Layers, bottom up"), so the document and
the code cannot drift apart: a new module must be placed there, and an import that runs upward fails here.
Imports inside functions count too (a lazy import is still a dependency); names loaded by string
(``importlib.import_module``, the modality registry) are not imports.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mmpref"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The mmpref modules ``name`` imports (``from pkg import sub`` counts as ``pkg.sub`` when that is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*up, base] if base else up)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t.startswith("mmpref") and t != name:
                out.add(t)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {n: imports(n, p, set(mods)) for n, p in mods.items()}


def layers() -> list[list[str]]:
    """``[[prefix, ...], ...]`` bottom up, from the block after "Layers, bottom up" in docs/architecture.md."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = re.search(r"Layers, bottom up.*?```\n(.*?)```", text, re.S)
    assert block, "docs/architecture.md lost its layer table"
    rows = []
    for line in block.group(1).splitlines():
        m = re.match(r"\s*(\d+)\s+(.*)", line)
        if m:
            rows.append((int(m.group(1)), re.findall(r"mmpref[\w.]*", m.group(2))))
    assert [n for n, _ in rows] == list(range(len(rows))), "layers must be numbered 0, 1, 2, ... bottom up"
    return [prefixes for _, prefixes in rows]


def layer_of(module: str, table: list[list[str]]) -> int:
    best = max(((len(p), i) for i, row in enumerate(table) for p in row
                if module == p or (p != "mmpref" and module.startswith(p + "."))), default=None)
    assert best is not None, f"{module} is in no layer of docs/architecture.md: add it to the table"
    return best[1]


def test_no_import_circles():
    g = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    assert not circles, f"modules that import each other in a circle: {circles}"


def test_no_module_imports_a_higher_layer():
    table = layers()
    upward = [f"{a} (layer {layer_of(a, table)}) -> {b} (layer {layer_of(b, table)})"
              for a, targets in graph().items() for b in sorted(targets) if layer_of(b, table) > layer_of(a, table)]
    assert not upward, "imports that run upward:\n  " + "\n  ".join(upward)


def test_the_walk_sees_lazy_and_relative_imports():
    """The checks above would pass vacuously if the walk missed imports: it must see a few known ones."""
    g = graph()
    assert "mmpref.losses.registry" in g["mmpref.losses.pairwise"]  # relative: from .registry import ...
    assert "mmpref.models.tango.convert" in g["mmpref.models.tango.pipeline"]  # inside a method
    assert "mmpref.training" in g["mmpref.cli"]  # inside a function
    assert layer_of("mmpref.training.engine", layers()) > layer_of("mmpref.adapters.llm", layers())
