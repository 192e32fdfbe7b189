"""Prefect tasks of the generator: task vectors, training the CVAE, sampling an adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from icm_core.data.categories import Category
from icm_core.data.config import DataConfig
from icm_core.generator.config import CVAEConfig, SampleConfig, TaskVectorConfig
from icm_core.generator.stages import compute_task_vector, sample_adapter, train_generator_stage
from icm_core.generator.task_vectors import TextEncoder, load_task_vector_with_kind, text_task_vector
from icm_core.infra.config import ResumeConfig
from icm_core.models.base_model import resolve_device
from icm_core.models.config import ModelConfig
from icm_core.zeroshot.from_text import text_adapter
from tasks.artifacts import (
    ArtifactRef,
    localize,
)
from tasks.progress import Progress
from tasks.stage import Build, device_slot, resumer, stage_task


@stage_task(
    "task_vectors",
    name="task-vector",
    task_run_name="task-vector-{category.name}",
    retries=1,
)
def task_vector_task(
    category: Category,
    data: ArtifactRef,
    lora: ArtifactRef | None,
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
    tv_cfg: TaskVectorConfig,
    root: str,
) -> Build:
    """Compute the category's task vector (Eq. 1, or its description embedding)."""

    def build(out: Path) -> dict[str, Any]:
        splits, lora_dir = localize(data, root).file("splits"), lora and localize(lora, root).folder
        with device_slot(model_cfg.device):
            result = compute_task_vector(
                category,
                splits,
                lora_dir,
                model_cfg,
                data_cfg,
                tv_cfg,
                out / "task_vector.safetensors",
            )
        return {"dim": result["dim"], "kind": result["kind"]}

    return build


@stage_task(
    "generator",
    category_arg=None,
    exclude=("resume",),
    name="train-generator",
    task_run_name="train-generator",
    retries=1,
)
def train_generator_task(
    loras: dict[str, ArtifactRef],
    task_vectors: dict[str, ArtifactRef],
    cvae_cfg: CVAEConfig,
    device: str,
    root: str,
    resume: ResumeConfig = ResumeConfig(),  # noqa: B008 - frozen config; not part of the cache key
    data: dict[str, ArtifactRef] | None = None,
    model_cfg: ModelConfig | None = None,
    data_cfg: DataConfig | None = None,
) -> Build:
    """Train one CVAE on the trajectories of all categories (resumable mid-way, ``resume``). With ``data`` (the
    categories' splits), ``model_cfg`` and ``data_cfg``, training stops early on the generated adapters'
    validation NLL (``cvae_cfg.val_every``, ``patience``); without them it runs ``cvae_cfg.epochs``."""
    logger = get_run_logger()
    validated = data is not None and model_cfg is not None and data_cfg is not None and cvae_cfg.val_every > 0

    progress: list[Progress] = []

    def on_epoch(epoch: int, row: dict) -> None:
        epoch += 1  # train_cvae counts epochs from 0
        if not progress:
            progress.append(Progress("train the ICM-LoRA CVAE (epochs)", cvae_cfg.epochs))
        progress[0].update(epoch)
        if "val" in row:
            what = "worst unrecovered gap" if cvae_cfg.val_criterion == "worst_gap" else "mean NLL"
            logger.info(
                "cvae epoch %d/%d recon %.5f kld %.3f validation %s %.4f",
                epoch,
                cvae_cfg.epochs,
                row["recon"],
                row["kld"],
                what,
                row["val"],
            )
        elif epoch % max(1, cvae_cfg.epochs // 10) == 0 or epoch == cvae_cfg.epochs:
            logger.info("cvae epoch %d/%d recon %.5f kld %.3f", epoch, cvae_cfg.epochs, row["recon"], row["kld"])

    def build(out: Path) -> dict[str, Any]:
        lora_dirs = {name: localize(ref, root).folder for name, ref in loras.items()}
        vector_files = {n: localize(ref, root).file("task_vector.safetensors") for n, ref in task_vectors.items()}
        validation = None
        if validated:
            validation = {
                "split_dirs": {name: localize(ref, root).file("splits") for name, ref in data.items()},
                "model_cfg": model_cfg,
                "data_cfg": data_cfg,
            }
        with device_slot(device):
            result = train_generator_stage(
                lora_dirs,
                vector_files,
                cvae_cfg,
                out / "generator.safetensors",
                device=str(resolve_device(device)),
                on_epoch=on_epoch,
                resume=resumer(out, epochs=resume.cvae_every_epochs),
                validation=validation,
            )
        keys = ("bytes", "num_checkpoints", "flat_length", "final_recon", "epochs_run", "best_epoch", "seconds")
        return {k: result[k] for k in keys}

    return build


@stage_task("adapters", name="sample-adapter", task_run_name="sample-{category}")
def sample_adapter_task(category: str, generator: ArtifactRef, sample_cfg: SampleConfig, root: str) -> Build:
    """Generate the category's adapter from the generator (no real checkpoint involved)."""

    def build(out: Path) -> dict[str, Any]:
        generator_file = localize(generator, root).file("generator.safetensors")
        result = sample_adapter(generator_file, out / "adapter", sample_cfg, category)
        return {"seconds": result["seconds"], "adapter_sha256": result["adapter_sha256"]}

    return build


@task(name="generate-adapter", task_run_name="generate-{label}", cache_policy=None, persist_result=False)
def generate_task(
    generator: str,
    out: str,
    sample_cfg: SampleConfig,
    label: str,
    category: str | None,
    description: str | None,
    task_vector_file: str | None,
    text_encoder: str,
    base_model: str | None = None,
    text: str | None = None,
    model: ModelConfig | None = None,
    num_samples: int | None = None,
) -> dict[str, Any]:
    if text:
        return text_adapter(
            generator, out, sample_cfg, text_path=text, model_cfg=model, num_samples=num_samples, base_model=base_model
        )
    kind = None
    if task_vector_file:
        vector, kind = load_task_vector_with_kind(task_vector_file)
    elif description:
        vector, kind = text_task_vector(description, TextEncoder(text_encoder)), f"description:{text_encoder}"
    else:
        vector = None
    return sample_adapter(
        generator,
        out,
        sample_cfg,
        category=category,
        task_vector=vector,
        task_vector_source=task_vector_file or ("description" if description else None),
        task_vector_kind=kind,
        base_model=base_model,
    )
