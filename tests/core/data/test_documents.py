"""Tests of icm_core.data.documents: reading a category's text from built-in and user sources."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from icm_core.data.categories import builtin_categories
from icm_core.data.config import DataConfig
from icm_core.data.documents import read_documents
from icm_core.data.text import DataError
from tests.core.data.support import SMALL, prose, user_category


def test_max_chars_cap_truncates_last_document() -> None:
    cfg = DataConfig(max_chars=5000, min_chars=100)
    docs = read_documents(builtin_categories()[1], cfg)
    assert sum(map(len, docs)) <= 5000
    assert sum(map(len, docs)) > 4500


def test_user_text_file(tmp_path: Path) -> None:
    docs = prose(6)
    path = tmp_path / "mine.txt"
    path.write_text("\n\n  \n".join(docs) + "\n", encoding="utf-8")
    assert read_documents(user_category(tmp_path, path), SMALL) == docs


def test_user_jsonl_file(tmp_path: Path) -> None:
    docs = prose(6)
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps({"body": d, "id": i}) for i, d in enumerate(docs)) + "\n\n", encoding="utf-8")
    assert read_documents(user_category(tmp_path, path, jsonl_field="body"), SMALL) == docs


def test_user_folder(tmp_path: Path) -> None:
    docs = prose(4)
    folder = tmp_path / "texts"
    folder.mkdir()
    for i, doc in reversed(list(enumerate(docs))):
        (folder / f"{i:02d}.txt").write_text(doc + "\n\nsecond paragraph " + str(i), encoding="utf-8")
    (folder / "ignored.md").write_text("not read", encoding="utf-8")
    read = read_documents(user_category(tmp_path, folder), SMALL)
    assert read == [f"{doc}\n\nsecond paragraph {i}" for i, doc in enumerate(docs)]


def test_non_utf8_names_file_and_offset(tmp_path: Path) -> None:
    path = tmp_path / "latin.txt"
    path.write_bytes(b"caf\xe9 " * 200)
    with pytest.raises(DataError, match=r"latin\.txt.*byte offset 3"):
        read_documents(user_category(tmp_path, path), SMALL)


def test_empty_source(tmp_path: Path) -> None:
    path = tmp_path / "empty.txt"
    path.write_text("  \n\n \t\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"'mine'.*empty\.txt.*empty"):
        read_documents(user_category(tmp_path, path), SMALL)


def test_missing_source(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_documents(user_category(tmp_path, tmp_path / "nope.txt"), SMALL)


def test_bad_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl: line 2: invalid JSON"):
        read_documents(user_category(tmp_path, path), SMALL)
    path.write_text('{"text": "fine"}\n\n{"other": "x"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl: line 3: missing field 'text'"):
        read_documents(user_category(tmp_path, path), SMALL)


def test_too_little_text(tmp_path: Path) -> None:
    path = tmp_path / "short.txt"
    path.write_text("just a few words", encoding="utf-8")
    with pytest.raises(DataError, match="category 'mine' has only 16 characters, need at least 500"):
        read_documents(user_category(tmp_path, path), SMALL)
