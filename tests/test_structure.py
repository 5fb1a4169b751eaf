"""The package's shape: no import circle, and the readers' modules load without Ray or torch."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "tune_landmarks"


def _imports(path: Path) -> set[str]:
    """Package modules a module imports, anywhere in it (lazy imports inside functions count too)."""
    mods = {p.stem for p in PKG.glob("*.py")}
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names = [node.module.split(".")[0]] if node.module else [a.name for a in node.names]
            out.update(n for n in names if n in mods)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tune_landmarks."):
            out.add(node.module.split(".")[1])
    return out - {path.stem, "__init__"}


def test_no_import_circle():
    graph = {p.stem: _imports(p) for p in PKG.glob("*.py") if p.stem != "__init__"}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                pytest.fail("import circle: " + " -> ".join(path[path.index(d):] + [m, d]))
            if d not in state:
                visit(d, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


@pytest.mark.parametrize("module", ["experiment", "verdict", "results", "config", "space"])
def test_readers_import_neither_ray_nor_torch(module):
    code = (f"import sys, tune_landmarks.{module}; "
            "heavy = [m for m in ('ray', 'torch', 'optuna') if m in sys.modules]; assert not heavy, heavy")
    if module in ("experiment", "verdict"):
        subprocess.run([sys.executable, "-c", code], check=True)
    else:  # results, config and space may need Optuna later, but never Ray or torch at import
        subprocess.run([sys.executable, "-c", code.replace("'optuna'", "")], check=True)
