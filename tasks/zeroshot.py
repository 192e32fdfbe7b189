"""Prefect tasks of the leave-out protocol: thin, cached wrappers around ``icm_core.zeroshot.stages``.

Each task keys its output folder by its inputs (``tasks.stage.run_stage``), so a rerun reuses every
finished fold, adapter and evaluation, and a killed run resumes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from icm_core.data.config import DataConfig
from icm_core.generator.config import SampleConfig, TaskVectorConfig
from icm_core.lora.trajectory import read_trajectory
from icm_core.models.config import ModelConfig
from icm_core.zeroshot.config import SelectorConfig
from icm_core.zeroshot.stages import (
    functional_generator,
    library_adapter,
    pool_splits,
    selector_adapter,
    vector_adapter,
)
from tasks.artifacts import ArtifactRef, localize
from tasks.stage import Build, device_slot, stage_task


@stage_task("zeroshot_pooled", category_arg="label", name="zeroshot-pool-data", task_run_name="pool-{label}")
def pool_data_task(label: str, data: dict[str, ArtifactRef], root: str) -> Build:
    """A fold's pooled training text (the multi-task LoRA's data): only the categories given."""

    def build(out: Path) -> dict[str, Any]:
        dirs = {name: localize(ref, root).file("splits") for name, ref in data.items()}
        result = pool_splits(dirs, out / "splits")
        return {"sources": result["sources"]}

    return build


@stage_task(
    "zeroshot_library", category_arg="label", name="zeroshot-library-adapter", task_run_name="{method}-{label}"
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
) -> Build:
    """Mean LoRA, 1-NN or softmax k-NN adapter from the given (training-fold) LoRAs."""

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

    return build


@stage_task(
    "zeroshot_adapters", category_arg="label", name="zeroshot-vector-adapter", task_run_name="{method}-{label}"
)
def vector_adapter_task(
    label: str, method: str, generator: ArtifactRef, vectors: list[ArtifactRef], sample_cfg: SampleConfig, root: str
) -> Build:
    """ICM-LoRA adapter from a task vector (or the mean of several: the mean-condition control)."""

    def build(out: Path) -> dict[str, Any]:
        result = vector_adapter(
            localize(generator, root).file("generator.safetensors"),
            [localize(v, root).file("task_vector.safetensors") for v in vectors],
            out / "adapter",
            sample_cfg,
        )
        return {"method": method, "vector_categories": [v.category for v in vectors], **result}

    return build


@stage_task(
    "generator",
    category_arg=None,
    name="zeroshot-functional-generator",
    task_run_name="functional-{label}",
    retries=1,
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
) -> Build:
    """A fold's generator with its decoder fine-tuned on the functional loss over the fold's training text."""
    from icm_core.zeroshot.functional import FunctionalConfig

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

    return build


@stage_task(
    "zeroshot_selector", category_arg="category", name="zeroshot-selector", task_run_name="selector-{category}"
)
def selector_task(
    category: str,
    data: ArtifactRef,
    multitask: ArtifactRef,
    library: dict[str, ArtifactRef],
    loras: dict[str, ArtifactRef],
    generators: dict[str, ArtifactRef],
    query: ArtifactRef,
    model_cfg: ModelConfig,
    tv_cfg: TaskVectorConfig,
    cfg: SelectorConfig,
    root: str,
) -> Build:
    """The selector's adapter for a held-out category from its fold's library (``library``: the mean LoRA and the
    k-NN adapter by name; ``loras``: the training categories' own fine-tunes; ``multitask``: the fold's multi-task
    LoRA, also the fine-tune's start), chosen on the category's train-split samples only."""

    def build(out: Path) -> dict[str, Any]:
        stored = {"multitask_lora": ("stored", read_trajectory(localize(multitask, root).folder).adapter_dir)}
        for name, ref in library.items():
            stored[name] = ("knn" if name.startswith("knn") else "stored", localize(ref, root).file("adapter"))
        with device_slot(model_cfg.device):
            result = selector_adapter(
                localize(data, root).file("splits"),
                stored,
                {n: read_trajectory(localize(r, root).folder).adapter_dir for n, r in loras.items()},
                {n: localize(r, root).file("generator.safetensors") for n, r in generators.items()},
                localize(query, root).file("task_vector.safetensors"),
                model_cfg,
                tv_cfg,
                cfg,
                out / "adapter",
            )
        return {"method": "selector", "winner": result["winner"], "winner_kind": result["winner_kind"],
                "scores": result["scores"], "seconds": result["seconds"]}  # fmt: skip

    return build


@stage_task(
    "zeroshot_selector", category_arg="category", name="new-category-selector", task_run_name="selector-{category}"
)
def new_category_selector_task(
    category: str,
    data: ArtifactRef,
    library: dict[str, str],
    library_sha256: dict[str, str],
    generator: ArtifactRef | None,
    query: ArtifactRef | None,
    model_cfg: ModelConfig,
    tv_cfg: TaskVectorConfig,
    cfg: SelectorConfig,
    root: str,
) -> Build:
    """The registry's first adapter for a new category: the selector's choice among the library's own LoRAs
    (``library``: category -> adapter folder, keyed in the cache by ``library_sha256``), their mean, a fine-tune
    started from that mean, and the current generator's draws (with ``query``, a text-computable task vector)."""

    def build(out: Path) -> dict[str, Any]:
        generators = {"icm_lora": localize(generator, root).file("generator.safetensors")} if generator else {}
        query_file = localize(query, root).file("task_vector.safetensors") if query is not None else None
        with device_slot(model_cfg.device):
            result = selector_adapter(
                localize(data, root).file("splits"), {}, library, generators if query_file else {}, query_file,
                model_cfg, tv_cfg, cfg, out / "adapter", finetune_from="mean_lora", mean=True,
            )  # fmt: skip
        return {"winner": result["winner"], "winner_kind": result["winner_kind"], "scores": result["scores"],
                "seconds": result["seconds"]}  # fmt: skip

    return build
