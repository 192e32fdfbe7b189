"""Prefect tasks of the leave-out protocol: thin, cached wrappers around ``icm_core.zeroshot.stages``.

Each task keys its output folder by its inputs (``tasks.stage.run_stage``), so a rerun reuses every
finished fold, adapter and evaluation, and a killed run resumes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from icm_core.data.config import DataConfig
from icm_core.evaluation.config import EvalConfig
from icm_core.generator.config import SampleConfig
from icm_core.models.config import ModelConfig
from icm_core.zeroshot.stages import (
    evaluate_blocks,
    functional_generator,
    library_adapter,
    pool_splits,
    vector_adapter,
)
from tasks.artifacts import ArtifactCachePolicy, ArtifactRef, localize
from tasks.evaluation import evaluation_inputs
from tasks.stage import TASK_DEFAULTS, device_slot, retry_unless_bad_input, run_stage


@task(
    name="zeroshot-pool-data",
    task_run_name="pool-{label}",
    cache_policy=ArtifactCachePolicy("zs_pooled", category_arg="label"),
    **TASK_DEFAULTS,
)
def pool_data_task(label: str, data: dict[str, ArtifactRef], root: str) -> ArtifactRef:
    """A fold's pooled training text (the multi-task LoRA's data): only the categories given."""
    inputs = {"label": label, "data": data, "root": root}

    def build(out: Path) -> dict[str, Any]:
        dirs = {name: localize(ref, root).file("splits") for name, ref in data.items()}
        result = pool_splits(dirs, out / "splits")
        return {"sources": result["sources"]}

    return run_stage("zs_pooled", label, inputs, build)


@task(
    name="zeroshot-library-adapter",
    task_run_name="{method}-{label}",
    cache_policy=ArtifactCachePolicy("zs_library", category_arg="label"),
    **TASK_DEFAULTS,
)
def library_adapter_task(
    label: str,
    method: str,
    loras: dict[str, ArtifactRef],
    vectors: dict[str, ArtifactRef],
    query: ArtifactRef | None,
    k: int,
    temperature: float,
    root: str,
) -> ArtifactRef:
    """Mean LoRA, 1-NN or softmax k-NN adapter from the given (training-fold) LoRAs."""
    inputs = {
        "label": label,
        "method": method,
        "loras": loras,
        "vectors": vectors,
        "query": query,
        "k": k,
        "temperature": temperature,
        "root": root,
    }

    def build(out: Path) -> dict[str, Any]:
        result = library_adapter(
            method,
            {n: localize(r, root).folder for n, r in loras.items()},
            {n: localize(r, root).file("task_vector.safetensors") for n, r in vectors.items()},
            localize(query, root).file("task_vector.safetensors") if query is not None else None,
            out / "adapter",
            k,
            temperature,
        )
        return {"method": method, **result}

    return run_stage("zs_library", label, inputs, build)


@task(
    name="zeroshot-vector-adapter",
    task_run_name="{method}-{label}",
    cache_policy=ArtifactCachePolicy("zs_generated", category_arg="label"),
    **TASK_DEFAULTS,
)
def vector_adapter_task(
    label: str, method: str, generator: ArtifactRef, vectors: list[ArtifactRef], sample_cfg: SampleConfig, root: str
) -> ArtifactRef:
    """ICM-LoRA adapter from a task vector (or the mean of several: the mean-condition control)."""
    inputs = {
        "label": label,
        "method": method,
        "generator": generator,
        "vectors": vectors,
        "sample_cfg": sample_cfg,
        "root": root,
    }

    def build(out: Path) -> dict[str, Any]:
        result = vector_adapter(
            localize(generator, root).file("generator.safetensors"),
            [localize(v, root).file("task_vector.safetensors") for v in vectors],
            out / "adapter",
            sample_cfg,
        )
        return {"method": method, "vector_categories": [v.category for v in vectors], **result}

    return run_stage("zs_generated", label, inputs, build)


@task(
    name="zeroshot-evaluate",
    task_run_name="nll-{category}-{method}",
    cache_policy=ArtifactCachePolicy("zs_eval", exclude=("prefix_like",)),
    retries=1,
    retry_condition_fn=retry_unless_bad_input,
    **TASK_DEFAULTS,
)
def block_eval_task(
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
    """Per-block NLL of the base model merged with ``adapter`` (None: base) on the category's test split.

    ``prefix_like`` (for the base model): an adapter of the category (its oracle) whose first adapted layer the
    base evaluation starts the shared prefix at; it changes no number, so it is not part of the cache key."""
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
            result = evaluate_blocks(
                splits, adapter_dir, model_cfg, data_cfg, eval_cfg, out / "nll.json", prefix_like=like
            )
        return {"method": method, "blocks": result["blocks"], "mean_nll": result["mean_nll"]}

    return run_stage("zs_eval", category, inputs, build)


@task(
    name="zeroshot-functional-generator",
    task_run_name="functional-{label}",
    cache_policy=ArtifactCachePolicy("generator", category_arg=None),
    retries=1,
    retry_condition_fn=retry_unless_bad_input,
    **TASK_DEFAULTS,
)
def functional_generator_task(
    label: str,
    generator: ArtifactRef,
    loras: dict[str, ArtifactRef],
    vectors: dict[str, ArtifactRef],
    data: dict[str, ArtifactRef],
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
    steps: int,
    lr: float,
    batch_blocks: int,
    recon_weight: float,
    root: str,
) -> ArtifactRef:
    """A fold's generator with its decoder fine-tuned on the functional loss over the fold's training text."""
    from icm_core.zeroshot.functional import FunctionalConfig

    inputs = {
        "label": label,
        "generator": generator,
        "loras": loras,
        "vectors": vectors,
        "data": data,
        "model_cfg": model_cfg,
        "data_cfg": data_cfg,
        "steps": steps,
        "lr": lr,
        "batch_blocks": batch_blocks,
        "recon_weight": recon_weight,
        "root": root,
    }
    cfg = FunctionalConfig(steps=steps, lr=lr, batch_blocks=batch_blocks, recon_weight=recon_weight)

    def build(out: Path) -> dict[str, Any]:
        with device_slot(model_cfg.device):
            result = functional_generator(
                localize(generator, root).file("generator.safetensors"),
                {n: localize(r, root).folder for n, r in loras.items()},
                {n: localize(r, root).file("task_vector.safetensors") for n, r in vectors.items()},
                {n: localize(r, root).file("splits") for n, r in data.items()},
                model_cfg,
                data_cfg,
                cfg,
                out / "generator.safetensors",
            )
        return {"functional_steps": steps, "final_lm": result["final_lm"], "seconds": result["seconds"]}

    return run_stage("generator", None, inputs, build)
