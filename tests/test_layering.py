"""Layering: icm_core is plain Python + PyTorch and must never import Prefect (flows/ and tasks/ do)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
CORE = REPO / "icm_core"


def _imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) in {"import_module", "__import__"}
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return found


def test_core_sources_never_import_prefect():
    files = sorted(CORE.rglob("*.py"))
    assert len(files) > 10, "icm_core sources not found"
    offenders = []
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for lineno, module in _imported_modules(tree):
            if module == "prefect" or module.startswith("prefect."):
                offenders.append(f"{path.relative_to(REPO)}:{lineno} imports {module}")
    assert not offenders, "\n".join(offenders)


def test_scanner_sees_all_import_forms():
    source = "import prefect\nfrom prefect.tasks import task\nimport importlib\nimportlib.import_module('prefect')\n"
    modules = [m for _, m in _imported_modules(ast.parse(source))]
    assert modules.count("prefect") == 2 and "prefect.tasks" in modules


def test_importing_stages_and_runner_does_not_load_prefect():
    code = (
        "import sys, icm_core.stages, icm_core.runner, icm_core.__main__; "
        "assert 'prefect' not in sys.modules, sorted(m for m in sys.modules if m.startswith('prefect'))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
