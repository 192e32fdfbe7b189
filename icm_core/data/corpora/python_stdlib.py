"""Text of the running Python interpreter's standard library: its module sources and pydoc's documentation topics."""

from __future__ import annotations

import ast
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from icm_core.data.corpora.base import BuiltinSource
from icm_core.data.text import DataError, read_utf8


__all__ = ["PYTHON_SOURCES", "stdlib_folder"]

_STDLIB_SKIP = {"test", "idlelib", "site-packages", "__pycache__", "this.py", "antigravity.py"}


def stdlib_folder() -> Path:
    """The standard library folder of this interpreter."""
    folder = Path(sysconfig.get_paths()["stdlib"])
    if not folder.is_dir():
        raise DataError(f"{folder}: the Python standard library folder of this interpreter was not found")
    return folder


def _python_code_documents() -> Iterator[str]:
    folder = stdlib_folder()
    files = sorted(
        p for p in folder.glob("*.py") if p.is_file() and p.name not in _STDLIB_SKIP and not p.name.startswith("_")
    )
    if not files:
        raise DataError(f"{folder}: no Python modules found in the standard library folder")
    for path in files:  # a generator: read_documents stops reading once max_chars is reached
        try:
            yield read_utf8(path)
        except DataError:
            continue  # a stdlib module in another encoding is simply skipped


def _python_docs_documents() -> Iterator[str]:
    path = stdlib_folder() / "pydoc_data" / "topics.py"
    if not path.is_file():
        raise DataError(f"{path}: pydoc_data/topics.py is missing from this Python installation")
    tree = ast.parse(read_utf8(path), filename=str(path))
    topics: Any = None
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign):
            targets = [node.target]
        else:
            continue
        if any(isinstance(t, ast.Name) and t.id == "topics" for t in targets) and node.value is not None:
            topics = ast.literal_eval(node.value)
    if not isinstance(topics, dict) or not topics:
        raise DataError(f"{path}: no 'topics = {{...}}' dictionary literal found")
    for _name, body in topics.items():
        if isinstance(body, str) and body.strip():
            yield body


PYTHON_SOURCES: dict[str, BuiltinSource] = {
    "python-code": BuiltinSource(
        "Python source code of standard library modules", _python_code_documents, False, "code", "python-stdlib"
    ),
    "python-docs": BuiltinSource(
        "Python language reference and library documentation prose",
        _python_docs_documents,
        False,
        "docs",
        "python-stdlib",
    ),
}
"""The two stdlib sources (both demo categories)."""
