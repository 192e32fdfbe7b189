"""Prefect tasks of the evaluation: PPL / BPC per block of any adapter, and the generator diagnostics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from icm_core.data.config import DataConfig
from icm_core.evaluation.config import EvalConfig
from icm_core.evaluation.stages import evaluate_adapter, generator_diagnostics
from icm_core.models.config import ModelConfig
from tasks.artifacts import (
    ArtifactCachePolicy,
    ArtifactRef,
    localize,
)
from tasks.stage import TASK_DEFAULTS, device_slot, retry_unless_bad_input, run_stage


def evaluation_inputs(
    data: ArtifactRef, adapter: ArtifactRef | None, prefix_like: ArtifactRef | None, root: str
) -> tuple[Path, Path | None, Path | None]:
    """This machine's paths for one evaluation: the category's splits, the adapter folder (None: the base model)
    and, for the base model only, the adapter whose first layer its shared-prefix pass starts at."""
    adapter_dir = localize(adapter, root).file("adapter") if adapter is not None else None
    like = localize(prefix_like, root).file("adapter") if adapter is None and prefix_like is not None else None
    return localize(data, root).file("splits"), adapter_dir, like


@task(
    name="evaluate",
    task_run_name="eval-{category}-{method}",
    cache_policy=ArtifactCachePolicy("eval", exclude=("prefix_like",)),
    retries=1,
    retry_condition_fn=retry_unless_bad_input,
    **TASK_DEFAULTS,
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
) -> ArtifactRef:
    """PPL / BPC of the base model merged with ``adapter`` (None: the base model) on the test split.

    ``prefix_like`` (for the base model): an adapter whose first adapted layer the base evaluation starts the
    shared prefix at, so the adapters scored after it on the same blocks run only their own layers. It does not
    change any number, so it is not part of the cache key."""
    inputs = {
        "category": category,
        "method": method,
        "data": data,
        "adapter": adapter,
        "model_cfg": model_cfg,
        "data_cfg": data_cfg,
        "eval_cfg": eval_cfg,
        "root": root,
    }

    def build(out: Path) -> dict[str, Any]:
        splits, adapter_dir, like = evaluation_inputs(data, adapter, prefix_like, root)
        with device_slot(model_cfg.device):
            score = evaluate_adapter(
                splits, adapter_dir, model_cfg, data_cfg, eval_cfg, out / "metrics.json", prefix_like=like
            )
        keys = ("ppl", "bpc", "tokens", "chars", "nll_nats", "block_nll", "block_tokens", "block_chars")
        return {"method": method, **{k: score[k] for k in (*keys, "blocks_available", "seconds")}}

    return run_stage("eval", category, inputs, build)


@task(
    name="generator-diagnostics",
    task_run_name="diagnostics-{label}",
    cache_policy=ArtifactCachePolicy("diagnostics", category_arg="label"),
    **TASK_DEFAULTS,
)
def diagnostics_task(
    label: str,
    draws: dict[str, list[ArtifactRef]],
    loras: dict[str, ArtifactRef],
    root: str,
    generator: ArtifactRef | None = None,
    task_vectors: dict[str, ArtifactRef] | None = None,
) -> ArtifactRef:
    """Distances to training checkpoints, z-draw spread (and, for the CVAE, latent usage) of one generator."""
    inputs = {
        "label": label,
        "draws": draws,
        "loras": loras,
        "root": root,
        "generator": generator,
        "task_vectors": task_vectors,
    }

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

    return run_stage("diagnostics", label, inputs, build)
