"""The library stays pure: it never imports slicer, qt, vtk or Training (they import it)."""

import ast
import subprocess
import sys
from pathlib import Path

LIB = Path(__file__).resolve().parents[1] / "KidneyTumorSegLib"
FORBIDDEN = {"slicer", "qt", "ctk", "vtk", "Training", "scipy"}


def test_no_forbidden_imports_in_library_sources():
    offenders = []
    for path in LIB.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(LIB)}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert not offenders, offenders


def test_segmenting_imports_nothing_forbidden():
    code = ("import sys, KidneyTumorSegLib.pipeline, KidneyTumorSegLib.cli, KidneyTumorSegLib.networks\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {sorted(FORBIDDEN)!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", out


def test_nothing_in_the_library_imports_the_command_line():
    """``cli`` is the top of the library: commands import modules, never the reverse (the demo once
    imported the CLI's private progress printer and summary while the CLI imported the demo)."""
    offenders = []
    for path in LIB.rglob("*.py"):
        if path.name == "__main__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                module = ("." * node.level) + (node.module or "")
                names = [a.name for a in node.names]
                if module in (".cli", "KidneyTumorSegLib.cli") or (module == "." and "cli" in names):
                    offenders.append(f"{path.relative_to(LIB)}: {module} {names}")
            elif isinstance(node, ast.Import):
                offenders += [f"{path.relative_to(LIB)}: {a.name}" for a in node.names if a.name == "KidneyTumorSegLib.cli"]
    assert not offenders, offenders
