"""The shape of the code: how the three layers may import each other, with no import cycles and no re-exports.

- ``icm_core`` is plain Python + PyTorch: it never imports Prefect, ``tasks`` or ``flows``;
- ``tasks`` wraps ``icm_core`` as Prefect tasks and never imports ``flows``;
- ``flows`` composes tasks; no flow imports the command line (``flows.cli`` imports the flows, one way);
- the whole graph (every import, function-level ones included) has no cycle: no two modules import each other;
- every ``from X import name`` takes ``name`` from the module that defines it (no re-export shims);
- compute modules never import presentation modules (they are left out of the compute stages' cache keys).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("icm_core", "tasks", "flows")


def imported_modules(tree: ast.AST) -> list[tuple[int, str, str | None]]:
    """``(line, module, name)`` for every import in ``tree`` (``name`` is None for ``import module``), including
    imports inside functions and ``importlib.import_module("...")`` calls."""
    found: list[tuple[int, str, str | None]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [(node.lineno, node.module, alias.name) for alias in node.names]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) in {"import_module", "__import__"}
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value, None))
    return found


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def sources() -> dict[str, Path]:
    """Every module of the three packages, by dotted name."""
    return {module_name(p): p for package in PACKAGES for p in sorted((REPO / package).rglob("*.py"))}


@cache
def parsed(name: str) -> ast.Module:
    return ast.parse(sources()[name].read_text(encoding="utf-8"), filename=str(sources()[name]))


def dependencies(name: str) -> Iterator[tuple[int, str]]:
    """The project modules ``name`` imports (``from pkg import submodule`` counts as the submodule)."""
    for line, module, imported in imported_modules(parsed(name)):
        target = f"{module}.{imported}" if imported and f"{module}.{imported}" in sources() else module
        if target in sources() and target != name:
            yield line, target


def graph() -> dict[str, set[str]]:
    return {name: {target for _, target in dependencies(name)} for name in sources()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
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
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_the_packages_were_found():
    names = sources()
    assert len([n for n in names if n.startswith("icm_core.")]) > 50
    assert "flows.cli" in names and "tasks.stage" in names


def test_the_import_graph_has_no_cycle():
    assert cycles(graph()) == []


def test_the_cycle_finder_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize(
    ("layer", "forbidden"),
    [
        ("icm_core", ("prefect", "tasks", "flows")),
        ("tasks", ("flows",)),
        ("flows", ("flows.cli",)),
    ],
)
def test_layers_import_one_way(layer, forbidden):
    offenders = []
    for name, path in sources().items():
        if not (name == layer or name.startswith(layer + ".")) or name == "flows.cli":
            continue
        for line, module, _ in imported_modules(parsed(name)):
            if any(module == f or module.startswith(f + ".") for f in forbidden) or module.endswith("__main__"):
                offenders.append(f"{path.relative_to(REPO)}:{line} imports {module}")
    assert not offenders, "\n".join(offenders)


def test_the_scanner_sees_every_import_form():
    source = "import prefect\nfrom prefect.tasks import task\ndef f():\n    importlib.import_module('flows.cli')\n"
    modules = [m for _, m, _ in imported_modules(ast.parse(source))]
    assert modules == ["prefect", "prefect.tasks", "flows.cli"]


def defined_names(name: str) -> set[str]:
    """Names a module defines itself (functions, classes, assignments), not names it imports."""
    names: set[str] = set()
    for node in parsed(name).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def test_every_name_is_imported_from_where_it_is_defined():
    """No re-export shims: a moved name is imported from its new home everywhere (tests and scripts too)."""
    files = [*sources().values(), *sorted((REPO / "tests").rglob("*.py")), *sorted((REPO / "scripts").glob("*.py"))]
    offenders = []
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for line, module, imported in imported_modules(tree):
            if module not in sources() or imported is None or f"{module}.{imported}" in sources():
                continue
            if imported not in defined_names(module):
                offenders.append(f"{path.relative_to(REPO)}:{line}: {imported} is not defined in {module}")
    assert not offenders, "\n".join(offenders)


def test_compute_modules_never_import_presentation_modules():
    """Compute stages leave the presentation modules out of their cache fingerprint; that is only sound if no
    compute module imports them (a table or figure change must never change a trained artifact)."""
    from tasks.fingerprints import PRESENTATION_MODULES, is_presentation

    def presentation(name: str) -> bool:
        return is_presentation(sources()[name].relative_to(REPO).as_posix())

    offenders = [
        f"{sources()[name].relative_to(REPO)}:{line} imports {target}"
        for name in sources()
        if not name.startswith("flows") and not presentation(name)
        for line, target in dependencies(name)
        if presentation(target)
    ]
    assert not offenders, "\n".join(offenders)
    for entry in PRESENTATION_MODULES:
        assert (REPO / entry).exists(), f"PRESENTATION_MODULES names {entry}, which does not exist"


@pytest.mark.slow
def test_importing_the_core_and_its_cli_does_not_load_prefect():
    code = (
        "import sys, icm_core.cli, icm_core.in_process, icm_core.generator.stages, icm_core.evaluation.stages; "
        "assert 'prefect' not in sys.modules, sorted(m for m in sys.modules if m.startswith('prefect'))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_presentation_change_keeps_compute_fingerprint(tmp_path, monkeypatch):
    import tasks.fingerprints as fingerprints

    code_root = tmp_path / "code"
    for package in ("icm_core", "tasks"):
        for path in (REPO / package).rglob("*.py"):
            target = code_root / path.relative_to(REPO)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())

    def both() -> tuple[str, str]:
        fingerprints.code_fingerprint.cache_clear()
        monkeypatch.setattr(fingerprints.icm_core, "__file__", str(code_root / "icm_core" / "__init__.py"))
        monkeypatch.setattr(fingerprints, "TASKS_DIR", code_root / "tasks")
        return fingerprints.code_fingerprint(False), fingerprints.code_fingerprint(True)

    try:
        compute, full = both()
        (code_root / "icm_core" / "report" / "plots.py").write_text("# a new figure style\n", encoding="utf-8")
        compute2, full2 = both()
        assert compute2 == compute and full2 != full
        (code_root / "icm_core" / "generator" / "cvae.py").write_text("# a changed model\n", encoding="utf-8")
        compute3, _ = both()
        assert compute3 != compute
    finally:
        monkeypatch.undo()
        fingerprints.code_fingerprint.cache_clear()
