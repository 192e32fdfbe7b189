"""The data stage over artifact folders: a category's text into train / val / test splits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from icm_core.data.categories import Category
from icm_core.data.config import DataConfig
from icm_core.data.documents import read_documents
from icm_core.data.splits import split_documents, write_splits


def prepare_data(category: Category, data_cfg: DataConfig, out: str | Path) -> dict[str, Any]:
    """Read a category's documents and write deterministic train/val/test splits to ``out``."""
    splits = split_documents(read_documents(category, data_cfg), data_cfg)
    summary = write_splits(splits, out)
    return {"category": category.name, "folder": str(out), **summary}
