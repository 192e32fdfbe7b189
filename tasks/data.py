"""Prefect task of the data stage: a category's text split into train / val / test."""

from __future__ import annotations

from icm_core.data.categories import Category
from icm_core.data.config import DataConfig
from icm_core.data.stages import prepare_data
from tasks.stage import Build, stage_task


@stage_task("data", name="prepare-data", task_run_name="data-{category.name}")
def prepare_data_task(category: Category, source_sha256: str, data_cfg: DataConfig, root: str) -> Build:
    """Split a category's text into train / val / test (``source_sha256``: its text's fingerprint, so edited text
    is split again)."""
    return lambda out: prepare_data(category, data_cfg, out / "splits")
