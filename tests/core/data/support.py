"""Helpers shared by the data tests: configs and tiny sources."""

from __future__ import annotations

from pathlib import Path

from icm_core.data.categories import Category
from icm_core.data.config import DataConfig
from icm_core.data.splits import CategorySplits


CFG = DataConfig()


SMALL = DataConfig(max_chars=20_000, min_chars=500)


BUILTIN_NAMES = ["wikipedia", "news", "reviews", "python-code", "python-docs"]


def user_category(tmp_path: Path, source: Path | str, **kwargs) -> Category:
    return Category(name="mine", description="My own text", source=str(source), **kwargs)


def prose(n: int, words: int = 40, tag: str = "doc") -> list[str]:
    return [" ".join(f"{tag}{i}w{j}" for j in range(words)) + "." for i in range(n)]


def check_splits(splits: CategorySplits, docs: list[str]) -> None:
    assert splits.train and splits.val and splits.test
    train, val, test = set(splits.train), set(splits.val), set(splits.test)
    assert not (train & val) and not (train & test) and not (val & test)
