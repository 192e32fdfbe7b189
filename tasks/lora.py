"""Prefect tasks of the LoRA stages: a category's fine-tune, and the mean of its own trajectory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger

from icm_core.data.config import DataConfig
from icm_core.infra.config import ResumeConfig
from icm_core.lora.config import LoraTrainConfig
from icm_core.lora.stages import finetune_lora, trajectory_mean_adapter
from icm_core.models.config import ModelConfig
from tasks.artifacts import (
    ArtifactRef,
    localize,
)
from tasks.progress import Progress
from tasks.stage import Build, device_slot, resumer, stage_task


@stage_task(
    "lora",
    exclude=("resume",),
    name="finetune-lora",
    task_run_name="lora-{category}",
    retries=1,
    retry_delay_seconds=5,
)
def finetune_task(
    category: str,
    data: ArtifactRef,
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
    lora_cfg: LoraTrainConfig,
    root: str,
    resume: ResumeConfig = ResumeConfig(),  # noqa: B008 - frozen config; not part of the cache key
) -> Build:
    """Fine-tune the category's LoRA adapter and keep its trajectory (resumable mid-way, ``resume``)."""
    logger = get_run_logger()

    progress: list[Progress] = []

    def on_step(step: int, loss: float) -> None:
        if not progress:  # created on the first step: a cache hit shows no bar
            progress.append(Progress(f"fine-tune lora-{category} (steps)", lora_cfg.steps))
        progress[0].update(step)
        if step % 10 == 0 or step == lora_cfg.steps:
            logger.info("lora-%s step %d/%d loss %.4f", category, step, lora_cfg.steps, loss)

    def build(out: Path) -> dict[str, Any]:
        with device_slot(model_cfg.device):
            splits = localize(data, root).file("splits")
            result = finetune_lora(
                splits,
                model_cfg,
                data_cfg,
                lora_cfg,
                out,
                on_step=on_step,
                resume=resumer(out, steps=resume.lora_every_steps),
            )
        return {k: result[k] for k in ("checkpoints", "final_loss", "train_blocks", "seconds", "adapter_sha256")}

    return build


@stage_task("trajectory_mean", name="trajectory-mean", task_run_name="trajectory-mean-{category}")
def trajectory_mean_task(category: str, lora: ArtifactRef, root: str) -> Build:
    """Reference point: the coordinate-wise mean of the category's own trajectory checkpoints, as an adapter."""

    def build(out: Path) -> dict[str, Any]:
        result = trajectory_mean_adapter(localize(lora, root).folder, out / "adapter")
        return {k: result[k] for k in ("adapter_sha256", "sources")}

    return build
