"""The category registry: where the set of task categories lives, and how changes to it are detected.

A registry is either one category file (YAML/JSON with a ``categories:`` list, see
:func:`icm_core.data.categories`) or a folder of such files, one or more categories each
(``*.yaml``, ``*.yml``, ``*.json``; hidden files and sub-folders are ignored). Adding a category is then
"drop a file into the folder" or "append an entry to the file".

A category's *fingerprint* covers its definition and the bytes of its source text, so editing either
counts as a change. :func:`diff_registry` compares the current fingerprints with the state a previous
scan saved and lists what was added, removed and changed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from icm_core.data.categories import Category, load_category_file
from icm_core.data.documents import source_fingerprint
from icm_core.data.text import DataError


__all__ = [
    "REGISTRY_SUFFIXES",
    "RegistryDiff",
    "category_fingerprint",
    "diff_registry",
    "load_registry",
    "registry_files",
    "registry_fingerprints",
]

REGISTRY_SUFFIXES = (".yaml", ".yml", ".json")


def registry_files(path: str | Path) -> list[Path]:
    """The category files of a registry: the file itself, or the folder's category files in name order."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"{path}: category registry not found (expected a category file or a folder of them)")
    files = (p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    return sorted(p for p in files if p.suffix.lower() in REGISTRY_SUFFIXES)


def load_registry(path: str | Path) -> list[Category]:
    """Read every category of a registry (a category file, or a folder of category files).

    Args:
        path: A ``.yaml`` / ``.yml`` / ``.json`` category file, or a folder of them.

    Returns:
        The categories: files in name order, entries in file order.

    Raises:
        DataError: The registry is missing or empty, a file is invalid (the message names it), or two
            files define the same category name (the message names both).
    """
    categories: list[Category] = []
    where: dict[str, Path] = {}
    files = registry_files(path)
    if not files:
        raise DataError(f"{path}: the category registry folder holds no {'/'.join(REGISTRY_SUFFIXES)} files")
    for file in files:
        for category in load_category_file(file):
            if category.name in where:
                raise DataError(f"{file}: category {category.name!r} is already defined in {where[category.name]}")
            where[category.name] = file
            categories.append(category)
    return categories


def category_fingerprint(category: Category) -> str:
    """sha256 of a category's definition (name, description, source, format) and of its source's bytes."""
    definition = json.dumps(category.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(f"{definition}\n{source_fingerprint(category)}".encode()).hexdigest()


def registry_fingerprints(categories: list[Category]) -> dict[str, str]:
    """``{name: fingerprint}`` of the categories."""
    return {c.name: category_fingerprint(c) for c in categories}


@dataclass(frozen=True)
class RegistryDiff:
    """What changed between two registry states (names, sorted)."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)

    def events(self) -> list[tuple[str, str]]:
        """``(change, name)`` pairs, change in ``added`` / ``removed`` / ``changed``."""
        return (
            [("added", n) for n in self.added]
            + [("removed", n) for n in self.removed]
            + [("changed", n) for n in self.changed]
        )


def diff_registry(previous: dict[str, str], current: dict[str, str]) -> RegistryDiff:
    """Compare two ``{name: fingerprint}`` states."""
    return RegistryDiff(
        added=sorted(set(current) - set(previous)),
        removed=sorted(set(previous) - set(current)),
        changed=sorted(n for n in set(current) & set(previous) if current[n] != previous[n]),
    )
