"""Tests of icm_core.data.categories: the category model, the built-in sets and category files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from icm_core.data.categories import Category, builtin_categories, load_category_file
from icm_core.data.corpora.sources import BUILTIN_SOURCES, DEMO_SOURCES
from icm_core.data.documents import read_documents
from icm_core.data.text import DataError
from tests.core.data.support import BUILTIN_NAMES, SMALL, prose


def test_builtin_categories_listed() -> None:
    categories = builtin_categories()
    assert [c.name for c in categories] == BUILTIN_NAMES
    assert list(DEMO_SOURCES) == BUILTIN_NAMES
    assert list(BUILTIN_SOURCES)[:5] == BUILTIN_NAMES  # the library lists the demo's five first
    for category in categories:
        assert category.source == f"builtin:{category.name}"
        assert category.is_builtin
        assert category.description and "\n" not in category.description and len(category.description) <= 300


def test_unknown_builtin_rejected() -> None:
    with pytest.raises(ValueError, match="unknown built-in source"):
        Category(name="x", description="d", source="builtin:nope")


@pytest.mark.parametrize("name", ["../x", "a/b", "A B", "", "Caps", "x" * 65, "-lead"])
def test_bad_category_names(name: str) -> None:
    with pytest.raises(ValueError, match="invalid category name"):
        Category(name=name, description="d", source="builtin:news")


@pytest.mark.parametrize("description", ["", "   ", "two\nlines", "x" * 301])
def test_bad_descriptions(description: str) -> None:
    with pytest.raises(ValueError, match="description"):
        Category(name="ok", description=description, source="builtin:news")


def test_category_is_frozen_and_strict() -> None:
    category = Category(name="ok", description="d", source="builtin:news")
    with pytest.raises(ValueError):
        category.name = "other"  # type: ignore[misc]
    with pytest.raises(ValueError, match="colour"):
        Category(name="ok", description="d", source="builtin:news", colour="red")


def test_load_category_file_yaml_resolves_paths(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "poems.txt").write_text("\n\n".join(prose(5)), encoding="utf-8")
    path = tmp_path / "categories.yaml"
    path.write_text(
        "categories:\n"
        "  - name: poems\n    description: Poems I wrote\n    source: data/poems.txt\n"
        "  - name: news\n    description: News\n    source: builtin:news\n",
        encoding="utf-8",
    )
    poems, news = load_category_file(path)
    assert Path(poems.source) == tmp_path / "data" / "poems.txt"
    assert news.source == "builtin:news"
    assert len(read_documents(poems, SMALL)) == 5


def test_load_category_file_json(tmp_path: Path) -> None:
    path = tmp_path / "cats.json"
    path.write_text(json.dumps({"categories": [{"name": "a", "description": "A", "source": "builtin:reviews"}]}))
    assert [c.name for c in load_category_file(path)] == ["a"]


def test_load_category_file_duplicate(tmp_path: Path) -> None:
    path = tmp_path / "cats.yaml"
    entry = {"name": "twice", "description": "d", "source": "builtin:news"}
    path.write_text(json.dumps({"categories": [entry, entry]}), encoding="utf-8")
    with pytest.raises(DataError, match="duplicate category name 'twice'"):
        load_category_file(path)


def test_load_category_file_unknown_field(tmp_path: Path) -> None:
    path = tmp_path / "cats.yaml"
    path.write_text("categories:\n  - {name: a, description: d, source: 'builtin:news', colour: red}\n")
    with pytest.raises(DataError, match=r"cats\.yaml: categories\[0\]: colour: unknown field 'colour'"):
        load_category_file(path)


def test_load_category_file_bad_name_and_shape(tmp_path: Path) -> None:
    path = tmp_path / "cats.yaml"
    path.write_text("categories:\n  - {name: '../x', description: d, source: 'builtin:news'}\n")
    with pytest.raises(DataError, match=r"categories\[0\]: name: .*invalid category name"):
        load_category_file(path)
    path.write_text("cats: []\n")
    with pytest.raises(DataError, match="top-level 'categories:'"):
        load_category_file(path)
