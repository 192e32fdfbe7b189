"""Prefect tasks of the detection pipeline: thin wrappers around ``icm_core.vision.stages``.

Same contract as the language pipeline's tasks (:func:`tasks.stage.stage_task`): the cache key comes from the
inputs (configs, upstream artifact hashes, code fingerprint, the detector's content identity), a valid output folder
is reused, heavy stages hold the device slot, inputs are read through :func:`~tasks.artifacts.localize` (so fsspec
roots work), and no task retries bad input. The generator, Model Soup and COND P-DIFF tasks are the language
pipeline's own (they read trajectories).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger

from icm_core.infra.config import ResumeConfig
from icm_core.vision import stages as vstages
from icm_core.vision.config import DetectionDataConfig, DetectionLoraConfig, DetectionTaskVectorConfig, DetectorConfig
from tasks.artifacts import ArtifactRef, localize
from tasks.stage import Build, device_slot, resumer, stage_task


@stage_task("data", category_arg="task_name", name="detection-data", task_run_name="det-data-{task_name}")
def detection_data_task(task_name: str, source_sha256: str, data_cfg: DetectionDataConfig, root: str) -> Build:
    """Render (built-in faces) or split (COCO file) one task's images and COCO annotations."""
    task_cfg = data_cfg.tasks[[vstages.task_slug(t) for t in data_cfg.tasks].index(task_name)]
    return lambda out: vstages.prepare_detection_task(task_cfg, data_cfg, out / "task")


@stage_task(
    "lora",
    category_arg="task_name",
    exclude=("resume",),
    name="detection-finetune-lora",
    task_run_name="det-lora-{task_name}",
    retries=1,
    retry_delay_seconds=5,
)
def detection_finetune_task(
    task_name: str,
    data: ArtifactRef,
    det_cfg: DetectorConfig,
    lora_cfg: DetectionLoraConfig,
    root: str,
    resume: ResumeConfig = ResumeConfig(),  # noqa: B008 - frozen config; not part of the cache key
) -> Build:
    """Fine-tune LoRA on the detector for one task and keep its trajectory (resumable mid-way)."""
    logger = get_run_logger()

    def on_step(step: int, loss: float) -> None:
        if step % max(1, lora_cfg.steps // 5) == 0 or step == lora_cfg.steps:
            logger.info("det-lora-%s step %d/%d loss %.4f", task_name, step, lora_cfg.steps, loss)

    def build(out: Path) -> dict[str, Any]:
        with device_slot(det_cfg.device):
            result = vstages.finetune_detector(
                localize(data, root).file("task"),
                det_cfg,
                lora_cfg,
                out,
                on_step=on_step,
                resume=resumer(out, steps=resume.lora_every_steps),
            )
        keys = ("checkpoints", "first_loss", "final_loss", "train_samples", "seconds", "adapter_sha256")
        return {k: result[k] for k in keys}

    return build


@stage_task(
    "task_vectors",
    category_arg="task_name",
    name="detection-task-vector",
    task_run_name="det-task-vector-{task_name}",
    retries=1,
)
def detection_task_vector_task(
    task_name: str,
    data: ArtifactRef,
    lora: ArtifactRef | None,
    det_cfg: DetectorConfig,
    tv_cfg: DetectionTaskVectorConfig,
    root: str,
) -> Build:
    """The task's condition (detector hidden layer, or CLIP text / image embedding)."""

    def build(out: Path) -> dict[str, Any]:
        with device_slot(det_cfg.device):
            result = vstages.detector_task_vector(
                localize(data, root).file("task"),
                localize(lora, root).folder if lora else None,
                det_cfg,
                tv_cfg,
                out / "task_vector.safetensors",
            )
        return {"dim": result["dim"]}

    return build


@stage_task(
    "eval",
    category_arg="task_name",
    name="detection-evaluate",
    task_run_name="det-eval-{task_name}-{method}",
    retries=1,
)
def detection_evaluate_task(
    task_name: str, method: str, data: ArtifactRef, adapter: ArtifactRef | None, det_cfg: DetectorConfig, root: str
) -> Build:
    """COCO mAP50 / mAP75 on the task's test split of the detector merged with ``adapter`` (None: base)."""

    def build(out: Path) -> dict[str, Any]:
        adapter_dir = localize(adapter, root).file("adapter") if adapter is not None else None
        with device_slot(det_cfg.device):
            score = vstages.evaluate_detector(
                localize(data, root).file("task"), adapter_dir, det_cfg, out / "metrics.json"
            )
        return {
            "method": method,
            **{k: score[k] for k in ("map", "map50", "map75", "recall100", "detections", "images", "boxes")},
        }

    return build
