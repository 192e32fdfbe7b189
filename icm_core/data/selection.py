"""Which categories a run uses, checked before anything starts (no Prefect here, so the CLI can refuse a bad
category file, or find an unchanged run's record, without starting a Prefect server)."""

from __future__ import annotations

from collections.abc import Sequence

from icm_core.data.categories import Category, builtin_categories
from icm_core.data.documents import iter_documents, source_fingerprint
from icm_core.data.registry import load_registry
from icm_core.data.text import DataError


def select_categories(categories_file: str | None, only: Sequence[str] | None) -> list[Category]:
    categories = load_registry(categories_file) if categories_file else builtin_categories()
    names = [c.name for c in categories]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"duplicate category names: {duplicates}")
    if only:
        unknown = sorted(set(only) - set(names))
        if unknown:
            raise ValueError(f"only: unknown categories {unknown}; known: {sorted(names)}")
        categories = [c for c in categories if c.name in set(only)]
    if not categories:
        raise ValueError("no categories to run")
    return categories


def check_category_sources(categories: Sequence[Category]) -> list[Category]:
    """Fail early, naming the category and file, when a user category's source is missing or holds no text.

    Reads each source only up to its first non-empty document (built-in sources ship with the install), so
    the CLI can refuse a bad category file in well under a second, before any Prefect server starts.

    Raises:
        DataError: A source is missing, unreadable or empty.
    """
    for category in categories:
        if category.is_builtin:
            continue
        source_fingerprint(category)  # every file of the source exists
        if next(iter_documents(category), None) is None:
            raise DataError(f"category {category.name!r}: source {category.source} is empty (no non-whitespace text)")
    return list(categories)
