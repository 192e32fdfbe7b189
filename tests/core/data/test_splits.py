"""Tests of icm_core.data.splits: deterministic train / val / test splits and their files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from icm_core.data.config import DataConfig
from icm_core.data.splits import read_splits, split_documents, write_splits
from icm_core.data.text import DataError
from icm_core.infra.io import ArtifactError
from tests.core.data.support import CFG, check_splits, prose


def test_split_deterministic_disjoint() -> None:
    docs = prose(100)
    a, b = split_documents(docs, CFG), split_documents(docs, CFG)
    assert a == b
    check_splits(a, docs)
    assert sorted(a.train + a.val + a.test) == sorted(docs)  # whole documents, none lost
    assert len(a.test) == 15 and len(a.val) == 10
    other = split_documents(docs, DataConfig(split_seed=1))
    assert other.test != a.test


def test_split_drops_duplicates() -> None:
    docs = prose(30) * 2
    splits = split_documents(docs, CFG)
    check_splits(splits, docs)
    assert len(splits.train) + len(splits.val) + len(splits.test) == 30


@pytest.mark.parametrize("count", [1, 2])
def test_split_few_huge_documents(count: int) -> None:
    docs = ["\n\n".join(prose(50, tag=f"d{k}p")) for k in range(count)]
    splits = split_documents(docs, CFG)
    check_splits(splits, docs)
    total = sum(map(len, docs))
    test_chars = sum(map(len, splits.test))
    assert 0.07 * total < test_chars < 0.25 * total
    assert splits == split_documents(docs, CFG)


def test_split_single_line_document() -> None:
    docs = [" ".join(f"w{i}" for i in range(400))]  # no paragraphs or lines: cut at spaces
    check_splits(split_documents(docs, CFG), docs)


def test_split_nothing() -> None:
    with pytest.raises(DataError):
        split_documents(["", "  "], CFG)


def test_write_read_splits_round_trip(tmp_path: Path) -> None:
    splits = split_documents(prose(20) + ['ünïcode "quotes"\nand lines'], CFG)
    summary = write_splits(splits, tmp_path / "s")
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [
        "splits.json",
        "test.jsonl",
        "train.jsonl",
        "val.jsonl",
    ]
    assert summary["splits"]["test"]["documents"] == len(splits.test)
    assert summary["splits"]["train"]["chars"] == sum(map(len, splits.train))
    assert json.loads((tmp_path / "s" / "splits.json").read_text()) == summary
    assert read_splits(tmp_path / "s") == splits


def test_read_splits_detects_corruption(tmp_path: Path) -> None:
    write_splits(split_documents(prose(20), CFG), tmp_path)
    val = tmp_path / "val.jsonl"
    val.write_text(val.read_text().replace("doc", "dog", 1))
    with pytest.raises(ArtifactError, match=r"val\.jsonl: sha256 mismatch"):
        read_splits(tmp_path)
    val.unlink()
    with pytest.raises(ArtifactError, match=r"val\.jsonl: split file not found"):
        read_splits(tmp_path)
