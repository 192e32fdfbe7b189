"""What every built-in text source is: a description, a family, a document generator and where it comes from."""

from __future__ import annotations

import gzip
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from icm_core.data.text import DataError, decode_utf8
from icm_core.infra.io import package_folder


__all__ = ["FAMILIES", "BuiltinSource", "Family", "package_file", "python_package_folder", "read_lenient"]

Family = Literal["prose", "code", "docs", "short", "structured"]
FAMILIES: dict[str, str] = {
    "prose": "Prose genres: encyclopedia, news, reviews, history, other languages",
    "code": "Source code in several programming languages",
    "docs": "Technical documentation: manuals, references, standards",
    "short": "Dialogue and short forms: quotes, riddles, forum posts, definitions, one-liners",
    "structured": "Structured and tabular text: data tables, JSON, rule files",
}
"""The source families of the category library, with one line each."""


@dataclass(frozen=True)
class BuiltinSource:
    """One built-in text source (a category of the library).

    Attributes:
        description: The category's one-line description.
        documents: Yields raw documents (not yet normalised), lazily: readers stop once they have enough.
        prose: Whether whitespace inside lines may be collapsed (natural language) or must be kept (code, tables).
        family: Which family of the library the source belongs to.
        origin: Where the text comes from (``pypi:<package>``, ``python-stdlib``, ``debian:<package>,...``).
        debian_packages: Debian packages the text is read from (fetched by ``make corpora``).
    """

    description: str
    documents: Callable[[], Iterator[str]]
    prose: bool
    family: Family
    origin: str
    debian_packages: tuple[str, ...] = field(default=())


def python_package_folder(package: str) -> Path:
    """Folder of an installed Python package, found without importing it."""
    folder = package_folder(package)
    if folder is None:
        raise DataError(
            f"the built-in text needs the {package!r} package, which is not installed; "
            f"install it with `pip install {package}`"
        )
    return folder


def package_file(package: str, relative: str) -> Path:
    """A file inside an installed Python package; the error says how to repair a broken install."""
    path = python_package_folder(package) / relative
    if not path.is_file():
        raise DataError(
            f"{path}: file missing from the installed {package!r} package; reinstall it with "
            f"`pip install --force-reinstall {package}`"
        )
    return path


def read_lenient(path: Path) -> str:
    """Read a bundled corpus file (gzip-compressed when its name ends in ``.gz`` / ``.dz``): UTF-8, or
    Windows-1252 for the few older files shipped that way."""
    data = path.read_bytes()
    if path.suffix in (".gz", ".dz"):
        data = gzip.decompress(data)
    try:
        return decode_utf8(data, path)
    except DataError:
        return data.decode("cp1252", errors="replace")
