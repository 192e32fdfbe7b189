"""Prefect tasks of the detection pipeline: thin wrappers around ``icm_core.vision.stages``.

Same contract as the language pipeline's tasks (``tasks/stage.py``): the cache key comes from the inputs (configs, upstream artifact
hashes, code fingerprint, the detector's content identity), a valid output folder is reused, heavy stages
hold the device slot, inputs are read through :func:`~tasks.artifacts.localize` (so fsspec roots work),
and no task retries bad input. The
generator, Model Soup and COND P-DIFF tasks are the language pipeline's own (they read trajectories).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from icm_core.infra.config import ResumeConfig
from icm_core.vision import stages as vstages
from icm_core.vision.config import DetectionDataConfig, DetectionLoraConfig, DetectionTaskVectorConfig, DetectorConfig
from tasks.artifacts import ArtifactCachePolicy, ArtifactRef, localize
from tasks.stage import TASK_DEFAULTS, device_slot, resumer, retry_unless_bad_input, run_stage


@task(
    name="detection-data",
    task_run_name="det-data-{task_name}",
    cache_policy=ArtifactCachePolicy("data", category_arg="task_name"),
    **TASK_DEFAULTS,
)
def detection_data_task(task_name: str, source_sha256: str, data_cfg: DetectionDataConfig, root: str) -> ArtifactRef:
    """Render (built-in faces) or split (COCO file) one task's images and COCO annotations."""
    inputs = {"task_name": task_name, "source_sha256": source_sha256, "data_cfg": data_cfg, "root": root}
    task_cfg = data_cfg.tasks[[vstages.task_slug(t) for t in data_cfg.tasks].index(task_name)]
    return run_stage(
        "data", task_name, inputs, lambda out: vstages.prepare_detection_task(task_cfg, data_cfg, out / "task")
    )


@task(
    name="detection-finetune-lora",
    task_run_name="det-lora-{task_name}",
    cache_policy=ArtifactCachePolicy("lora", category_arg="task_name", exclude=("resume",)),
    retries=1,
    retry_condition_fn=retry_unless_bad_input,
    retry_delay_seconds=5,
    **TASK_DEFAULTS,
)
def detection_finetune_task(
    task_name: str,
    data: ArtifactRef,
    det_cfg: DetectorConfig,
    lora_cfg: DetectionLoraConfig,
    root: str,
    resume: ResumeConfig = ResumeConfig(),  # noqa: B008 - frozen config; not part of the cache key
) -> ArtifactRef:
    """Fine-tune LoRA on the detector for one task and keep its trajectory (resumable mid-way)."""
    logger = get_run_logger()
    inputs = {"task_name": task_name, "data": data, "det_cfg": det_cfg, "lora_cfg": lora_cfg, "root": root}

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

    return run_stage("lora", task_name, inputs, build)


@task(
    name="detection-task-vector",
    task_run_name="det-task-vector-{task_name}",
    cache_policy=ArtifactCachePolicy("task_vectors", category_arg="task_name"),
    retries=1,
    retry_condition_fn=retry_unless_bad_input,
    **TASK_DEFAULTS,
)
def detection_task_vector_task(
    task_name: str,
    data: ArtifactRef,
    lora: ArtifactRef | None,
    det_cfg: DetectorConfig,
    tv_cfg: DetectionTaskVectorConfig,
    root: str,
) -> ArtifactRef:
    """The task's condition (detector hidden layer, or CLIP text / image embedding)."""
    inputs = {"task_name": task_name, "data": data, "lora": lora, "det_cfg": det_cfg, "tv_cfg": tv_cfg, "root": root}

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

    return run_stage("task_vectors", task_name, inputs, build)


@task(
    name="detection-evaluate",
    task_run_name="det-eval-{task_name}-{method}",
    cache_policy=ArtifactCachePolicy("eval", category_arg="task_name"),
    retries=1,
    retry_condition_fn=retry_unless_bad_input,
    **TASK_DEFAULTS,
)
def detection_evaluate_task(
    task_name: str, method: str, data: ArtifactRef, adapter: ArtifactRef | None, det_cfg: DetectorConfig, root: str
) -> ArtifactRef:
    """COCO mAP50 / mAP75 on the task's test split of the detector merged with ``adapter`` (None: base)."""
    inputs = {
        "task_name": task_name,
        "method": method,
        "data": data,
        "adapter": adapter,
        "det_cfg": det_cfg,
        "root": root,
    }

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

    return run_stage("eval", task_name, inputs, build)
