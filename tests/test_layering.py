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
        "import sys, icm_core.stages, icm_core.in_process, icm_core.cli; "
        "assert 'prefect' not in sys.modules, sorted(m for m in sys.modules if m.startswith('prefect'))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_presentation_modules_are_imported_only_by_reports_and_flows():
    """Compute stages leave the presentation modules out of their cache fingerprint; that is only sound if
    no compute module imports them (a table or figure change must never change a trained artifact)."""
    from tasks.fingerprints import PRESENTATION_MODULES

    dotted = {name.removesuffix(".py").replace("/", ".") for name in PRESENTATION_MODULES}
    offenders = []
    for package in ("icm_core", "tasks"):
        for path in sorted((REPO / package).rglob("*.py")):
            name = path.relative_to(REPO).as_posix()
            if name in PRESENTATION_MODULES:
                continue
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for lineno, module in _imported_modules(tree):
                if module in dotted:
                    offenders.append(f"{name}:{lineno} imports {module}")
    assert not offenders, "\n".join(offenders)
    assert all((REPO / name).is_file() or name == "tasks/ablations.py" for name in PRESENTATION_MODULES)


def test_presentation_change_keeps_compute_fingerprint(tmp_path, monkeypatch):
    import tasks.fingerprints as artifacts

    code_root = tmp_path / "code"
    for package in ("icm_core", "tasks"):
        for path in (REPO / package).rglob("*.py"):
            target = code_root / path.relative_to(REPO)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())

    def fingerprints() -> tuple[str, str]:
        artifacts.code_fingerprint.cache_clear()
        monkeypatch.setattr(artifacts.icm_core, "__file__", str(code_root / "icm_core" / "__init__.py"))
        monkeypatch.setattr(artifacts, "TASKS_DIR", code_root / "tasks")
        return artifacts.code_fingerprint(False), artifacts.code_fingerprint(True)

    try:
        compute, full = fingerprints()
        (code_root / "icm_core" / "plots.py").write_text("# a new figure style\n", encoding="utf-8")
        compute2, full2 = fingerprints()
        assert compute2 == compute and full2 != full
        (code_root / "icm_core" / "cvae.py").write_text("# a changed model\n", encoding="utf-8")
        compute3, _ = fingerprints()
        assert compute3 != compute
    finally:
        monkeypatch.undo()
        artifacts.code_fingerprint.cache_clear()
