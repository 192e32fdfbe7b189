"""Prefect task of the data stage."""

from __future__ import annotations

from prefect import task

from icm_core.data.categories import Category
from icm_core.data.config import DataConfig
from icm_core.data.stages import prepare_data
from tasks.artifacts import (
    ArtifactCachePolicy,
    ArtifactRef,
)
from tasks.stage import TASK_DEFAULTS, run_stage


@task(
    name="prepare-data",
    task_run_name="data-{category.name}",
    cache_policy=ArtifactCachePolicy("data"),
    **TASK_DEFAULTS,
)
def prepare_data_task(category: Category, source_sha256: str, data_cfg: DataConfig, root: str) -> ArtifactRef:
    """Split a category's text into train / val / test."""
    inputs = {"category": category, "source_sha256": source_sha256, "data_cfg": data_cfg, "root": root}
    return run_stage(
        "data", category.name, inputs, lambda out: prepare_data(category, data_cfg, out / "splits")
    )
