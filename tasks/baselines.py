"""Prefect tasks of the baselines: Model Soup and COND P-DIFF."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import get_run_logger

from icm_core.baselines.config import PDiffConfig, SoupConfig
from icm_core.baselines.stages import sample_pdiff_states, soup_adapter, train_pdiff_stage, write_sampled_adapter
from icm_core.generator.config import SampleConfig
from icm_core.infra.config import ResumeConfig
from icm_core.models.base_model import resolve_device
from tasks.artifacts import (
    ArtifactRef,
    localize,
)
from tasks.progress import Progress
from tasks.stage import Build, device_slot, resumer, stage_task


@stage_task("soup", category_arg="label", name="model-soup", task_run_name="soup-{label}")
def soup_task(label: str, loras: dict[str, ArtifactRef], soup_cfg: SoupConfig, root: str) -> Build:
    """Model Soup baseline: average adapters as weight deltas into one PEFT adapter.

    ``label`` names the soup: ``"all"`` for the soup of every category's final adapter, or a category for
    the soup of its own trajectory (``soup.scope='trajectory'``).
    """

    def build(out: Path) -> dict[str, Any]:
        lora_dirs = {name: localize(ref, root).folder for name, ref in loras.items()}
        result = soup_adapter(lora_dirs, soup_cfg, out / "adapter")
        return {k: result[k] for k in ("adapter_sha256", "rank", "sources")}

    return build


@stage_task(
    "pdiff",
    category_arg=None,
    exclude=("resume",),
    name="train-cond-pdiff",
    task_run_name="train-cond-pdiff",
    retries=1,
)
def train_pdiff_task(
    loras: dict[str, ArtifactRef],
    task_vectors: dict[str, ArtifactRef],
    pdiff_cfg: PDiffConfig,
    device: str,
    root: str,
    resume: ResumeConfig = ResumeConfig(),  # noqa: B008 - frozen config; not part of the cache key
) -> Build:
    """COND P-DIFF baseline: autoencoder + conditional latent DDPM on the same trajectories and task vectors
    (resumable mid-way, ``resume``)."""
    logger = get_run_logger()

    bars: dict[str, Progress] = {}
    totals = {"autoencoder": pdiff_cfg.ae_epochs, "ddpm": pdiff_cfg.ddpm_steps}

    def on_progress(phase: str, step: int, loss: float) -> None:
        if phase in totals:
            if phase not in bars:
                bars[phase] = Progress(f"COND P-DIFF {phase}", totals[phase])
            bars[phase].update(step + 1 if phase == "autoencoder" else step)
        if phase == "autoencoder":
            step += 1
            if step % max(1, pdiff_cfg.ae_epochs // 5) == 0 or step == pdiff_cfg.ae_epochs:
                logger.info("cond-pdiff autoencoder epoch %d/%d recon %.5f", step, pdiff_cfg.ae_epochs, loss)
        elif step % max(1, pdiff_cfg.ddpm_steps // 5) < pdiff_cfg.log_every or step == pdiff_cfg.ddpm_steps:
            logger.info("cond-pdiff ddpm step %d/%d loss %.5f", step, pdiff_cfg.ddpm_steps, loss)

    def build(out: Path) -> dict[str, Any]:
        lora_dirs = {name: localize(ref, root).folder for name, ref in loras.items()}
        vector_files = {n: localize(ref, root).file("task_vector.safetensors") for n, ref in task_vectors.items()}
        with device_slot(device):
            result = train_pdiff_stage(
                lora_dirs,
                vector_files,
                pdiff_cfg,
                out / "pdiff.safetensors",
                device=str(resolve_device(device)),
                on_progress=on_progress,
                resume=resumer(out, ae_epochs=resume.pdiff_every_epochs, ddpm_steps=resume.pdiff_every_steps),
            )
        keys = ("bytes", "num_checkpoints", "flat_length", "final_ae_recon", "final_ddpm_loss", "seconds")
        return {k: result[k] for k in keys}

    return build


@stage_task(
    "pdiff_adapters",
    category_arg=None,
    fan_out=("categories", "category"),
    name="sample-cond-pdiff",
    task_run_name="sample-pdiff",
)
def sample_pdiff_task(
    categories: list[str], pdiff: ArtifactRef, sample_cfg: SampleConfig, root: str
) -> Callable[[str], Build]:
    """Generate the categories' adapters with COND P-DIFF, in order, denoised together in one batch (the 1000
    steps are paid once, not once per category). Each category has its own output folder, keyed by the
    batch's inputs plus its name; a lost folder is rebuilt by sampling the same batch again, so the rebuilt
    adapter is bit-identical to the lost one (batched float rounding depends on the batch)."""
    sampled: dict[str, Any] = {}

    def build_for(name: str) -> Build:
        def build(out: Path) -> dict[str, Any]:
            if not sampled:
                pdiff_file = localize(pdiff, root).file("pdiff.safetensors")
                states, adapter_config, seconds = sample_pdiff_states(pdiff_file, sample_cfg, categories)
                sampled.update(states=states, config=adapter_config, seconds=seconds)
            digest = write_sampled_adapter(out / "adapter", sampled["states"][name], sampled["config"])
            return {"seconds": sampled["seconds"], "batch_categories": len(categories), "adapter_sha256": digest}

        return build

    return build_for
