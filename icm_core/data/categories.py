"""The category model: a name, a one-line description and a text source; category files; the built-in sets.

A *category* is one task of ICM-LoRA. Its source is either a built-in corpus (``builtin:<id>``, one
of :data:`icm_core.data.corpora`) or a user file / folder. :func:`builtin_categories` gives
the five demo categories, :func:`library_categories` the whole library (36 categories, five families).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from icm_core.data.corpora.base import FAMILIES
from icm_core.data.corpora.sources import BUILTIN_SOURCES, DEMO_SOURCES
from icm_core.data.names import validate_category_name
from icm_core.data.text import DataError, decode_utf8


__all__ = [
    "BUILTIN_PREFIX",
    "Category",
    "builtin_categories",
    "category_family",
    "library_categories",
    "load_category_file",
]

BUILTIN_PREFIX = "builtin:"


class Category(BaseModel):
    """One task category: a name, a one-line description and where its text comes from."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(
        description="Category name; it becomes a folder name and an artifact key: 1-64 lowercase letters, "
        "digits, '-' or '_'."
    )
    description: str = Field(
        description="One-line description of the category's text (non-empty, at most 300 characters)."
    )
    source: str = Field(
        description="'builtin:<id>' for a built-in corpus (the demo's wikipedia, news, reviews, python-code, "
        "python-docs, or any other category of the library: see docs/categories.md), or a path to a .txt file "
        "(documents separated by blank lines), a .jsonl file (one JSON object per line) or a folder of .txt "
        "files (one document per file)."
    )
    format: Literal["auto", "text", "jsonl"] = Field(
        "auto",
        description="How to read a user source: 'auto' picks by extension ('.jsonl' -> jsonl, else text); "
        "ignored for built-in sources.",
    )
    jsonl_field: str = Field("text", min_length=1, description="Field holding the text in each JSONL object.")

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        return validate_category_name(value)

    @field_validator("description")
    @classmethod
    def _one_line(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("description must not be empty")
        if "\n" in value or "\r" in value:
            raise ValueError("description must be a single line")
        if len(value) > 300:
            raise ValueError(f"description is {len(value)} characters long; at most 300 allowed")
        return value

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("source must not be empty")
        if value.startswith(BUILTIN_PREFIX):
            key = value[len(BUILTIN_PREFIX) :]
            if key not in BUILTIN_SOURCES:
                raise ValueError(
                    f"unknown built-in source {value!r}; choose one of "
                    + ", ".join(BUILTIN_PREFIX + k for k in BUILTIN_SOURCES)
                )
        return value

    @property
    def is_builtin(self) -> bool:
        """Whether the source is a built-in demo corpus."""
        return self.source.startswith(BUILTIN_PREFIX)

    @property
    def family(self) -> str | None:
        """The library family of a built-in source (``prose``, ``code``, ``docs``, ``short``, ``structured``);
        None for a user source."""
        return category_family(self)


def category_family(category: Category) -> str | None:
    """The library family of a category's built-in source, or None for a user source."""
    if not category.is_builtin:
        return None
    return BUILTIN_SOURCES[category.source[len(BUILTIN_PREFIX) :]].family


def _builtin(key: str) -> Category:
    return Category(name=key, description=BUILTIN_SOURCES[key].description, source=BUILTIN_PREFIX + key)


def builtin_categories() -> list[Category]:
    """The five built-in demo categories, in the demo's order.

    Returns:
        Categories named ``wikipedia``, ``news``, ``reviews``, ``python-code`` and ``python-docs``.
    """
    return [_builtin(key) for key in DEMO_SOURCES]


def library_categories(families: Iterable[str] | None = None) -> list[Category]:
    """Every built-in category of the library (the demo's five first), optionally only some families.

    Args:
        families: Keep only these families (``prose``, ``code``, ``docs``, ``short``, ``structured``).

    Raises:
        ValueError: An unknown family name.
    """
    wanted = set(FAMILIES) if families is None else set(families)
    unknown = sorted(wanted - set(FAMILIES))
    if unknown:
        raise ValueError(f"unknown families {unknown}; choose from {sorted(FAMILIES)}")
    return [_builtin(key) for key, source in BUILTIN_SOURCES.items() if source.family in wanted]


def load_category_file(path: str | Path) -> list[Category]:
    """Read categories from a YAML or JSON file with a top-level ``categories:`` list.

    Relative ``source`` paths are resolved against the file's folder (``builtin:`` sources are kept).

    Args:
        path: A ``.yaml`` / ``.yml`` / ``.json`` file.

    Returns:
        The categories, in file order.

    Raises:
        DataError: The file is missing or malformed, a category is invalid (the message names the
            file, the entry and the offending field), or two categories share a name.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: category file not found")
    raw = decode_utf8(path.read_bytes(), path)
    try:
        payload = json.loads(raw) if path.suffix.lower() == ".json" else yaml.safe_load(raw)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise DataError(f"{path}: cannot parse category file ({exc})") from exc
    if not isinstance(payload, dict) or "categories" not in payload:
        raise DataError(f"{path}: expected a mapping with a top-level 'categories:' list")
    extra = sorted(set(payload) - {"categories"})
    if extra:
        raise DataError(f"{path}: unknown top-level field(s) {', '.join(map(repr, extra))}; only 'categories' allowed")
    entries = payload["categories"]
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{path}: 'categories' must be a non-empty list")

    categories: list[Category] = []
    seen: dict[str, int] = {}
    for index, entry in enumerate(entries):
        where = f"{path}: categories[{index}]"
        if not isinstance(entry, dict):
            raise DataError(f"{where}: expected a mapping, got {type(entry).__name__}")
        entry = dict(entry)
        source = entry.get("source")
        if isinstance(source, str) and source.strip() and not source.strip().startswith(BUILTIN_PREFIX):
            source_path = Path(source.strip()).expanduser()
            if not source_path.is_absolute():
                source_path = path.parent.absolute() / source_path
            entry["source"] = str(source_path)
        try:
            category = Category.model_validate(entry)
        except ValidationError as exc:
            raise DataError(f"{where}: {_format_validation_error(exc)}") from exc
        if category.name in seen:
            raise DataError(
                f"{where}: duplicate category name {category.name!r} (also categories[{seen[category.name]}])"
            )
        seen[category.name] = index
        categories.append(category)
    return categories


def _format_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ())) or "entry"
        msg = err.get("msg", "invalid")
        if err.get("type") == "extra_forbidden":
            msg = f"unknown field {loc!r}"
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)
