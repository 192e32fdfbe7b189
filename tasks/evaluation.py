"""Prefect tasks of the evaluation: PPL / BPC per block of any adapter, and the generator diagnostics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from icm_core.data.config import DataConfig
from icm_core.evaluation.config import EvalConfig
from icm_core.evaluation.stages import evaluate_adapter, generator_diagnostics
from icm_core.models.config import ModelConfig
from tasks.artifacts import (
    ArtifactRef,
    localize,
)
from tasks.stage import Build, device_slot, stage_task


@stage_task(
    "eval",
    exclude=("prefix_like",),
    name="evaluate",
    task_run_name="eval-{category}-{method}",
    retries=1,
)
def evaluate_task(
    category: str,
    method: str,
    data: ArtifactRef,
    adapter: ArtifactRef | None,
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
    eval_cfg: EvalConfig,
    root: str,
    prefix_like: ArtifactRef | None = None,
) -> Build:
    """PPL / BPC of the base model merged with ``adapter`` (None: the base model) on the category's test split,
    with every scored block's NLL, token and character count (what the paired bootstrap intervals of every report
    resample: the seen-category report, the leave-out protocol's and the ablations').

    ``prefix_like`` (for the base model): an adapter whose first adapted layer the base evaluation starts the
    shared prefix at, so the adapters scored after it on the same blocks run only their own layers. It does not
    change any number, so it is not part of the cache key."""

    def build(out: Path) -> dict[str, Any]:
        splits = localize(data, root).file("splits")
        adapter_dir = localize(adapter, root).file("adapter") if adapter is not None else None
        like = localize(prefix_like, root).file("adapter") if adapter is None and prefix_like is not None else None
        with device_slot(model_cfg.device):
            score = evaluate_adapter(
                splits, adapter_dir, model_cfg, data_cfg, eval_cfg, out / "metrics.json", prefix_like=like
            )
        keys = ("ppl", "bpc", "tokens", "chars", "nll_nats", "block_nll", "block_tokens", "block_chars")
        return {"method": method, **{k: score[k] for k in (*keys, "blocks_available", "seconds")}}

    return build


@stage_task("diagnostics", category_arg="label", name="generator-diagnostics", task_run_name="diagnostics-{label}")
def diagnostics_task(
    label: str,
    draws: dict[str, list[ArtifactRef]],
    loras: dict[str, ArtifactRef],
    root: str,
    generator: ArtifactRef | None = None,
    task_vectors: dict[str, ArtifactRef] | None = None,
) -> Build:
    """Distances to training checkpoints, z-draw spread (and, for the CVAE, latent usage) of one generator."""

    def build(out: Path) -> dict[str, Any]:
        draw_dirs = {n: [localize(r, root).file("adapter") for r in refs] for n, refs in draws.items()}
        lora_dirs = {name: localize(ref, root).folder for name, ref in loras.items()}
        gen_file = localize(generator, root).file("generator.safetensors") if generator is not None else None
        vector_files = (
            {n: localize(r, root).file("task_vector.safetensors") for n, r in task_vectors.items()}
            if task_vectors
            else None
        )
        return generator_diagnostics(draw_dirs, lora_dirs, out / "diagnostics.json", gen_file, vector_files)

    return build
