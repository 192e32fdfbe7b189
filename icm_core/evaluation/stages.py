"""The evaluation stages over artifact folders: PPL / BPC of an adapter, and what a generator's adapters are."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from icm_core.data.config import DataConfig
from icm_core.data.splits import read_splits
from icm_core.evaluation.config import EvalConfig
from icm_core.evaluation.diagnostics import adapter_report, latent_usage
from icm_core.evaluation.perplexity import evaluate_lm
from icm_core.generator.dataset import generator_training_data
from icm_core.generator.generator import load_generator
from icm_core.infra.io import write_json
from icm_core.lora.adapters import (
    adapter_first_layer,
    merged_into,
    read_adapter,
)
from icm_core.lora.trajectory import load_trajectory_checkpoints, read_trajectory
from icm_core.models.base_model import (
    base_model_names,
    load_tokenizer,
    shared_base_model,
)
from icm_core.models.config import ModelConfig


def evaluate_adapter(
    data_dir: str | Path,
    adapter_dir: str | Path | None,
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
    eval_cfg: EvalConfig,
    out_path: str | Path | None = None,
    prefix_like: str | Path | None = None,
) -> dict[str, Any]:
    """PPL/BPC on the category's test split of the base model merged with ``adapter_dir`` (None: base model),
    with the NLL, token and character count of every scored block. The base model is loaded once per process
    and each adapter merged into it for the evaluation only (see ``merged_into``)."""
    started = time.perf_counter()
    tokenizer = load_tokenizer(model_cfg)
    texts = read_splits(data_dir).test
    with (
        shared_base_model(model_cfg) as base,
        merged_into(base, adapter_dir, base_model_names(model_cfg)) as model,
    ):
        # Layers below the adapter's first are the base model's: their states are computed once per block set.
        # The base model starts at the layer of ``prefix_like`` (an adapter scored next on these blocks): same numbers,
        # and its prefix pass fills the cache for that adapter.
        like = adapter_dir if adapter_dir is not None else prefix_like
        start = adapter_first_layer(like) if like is not None else 0
        score = evaluate_lm(model, tokenizer, texts, data_cfg.seq_len, eval_cfg, start).as_dict()
    result = {"adapter_dir": str(adapter_dir) if adapter_dir else None, **score}
    if out_path is not None:
        # The file holds what is reproducible (a rebuilt evaluation writes the same bytes, so what depends on it
        # stays cached); the wall time is only returned.
        write_json(out_path, result)
    return {**result, "seconds": time.perf_counter() - started}


def generator_diagnostics(
    draw_dirs: dict[str, list[str | Path]],
    trajectory_dirs: dict[str, str | Path],
    out_path: str | Path,
    generator_path: str | Path | None = None,
    task_vector_paths: dict[str, str | Path] | None = None,
) -> dict[str, Any]:
    """Diagnostics of one generator's adapters (``draw_dirs``: per category, its draws, the scored one first):
    distance to the nearest training checkpoint of its own and of any other category, to its final adapter,
    spread across z draws; with ``generator_path`` (an ICM-LoRA generator) also the CVAE's latent usage."""
    draws = {name: [read_adapter(folder)[0] for folder in dirs] for name, dirs in draw_dirs.items()}
    checkpoints = {name: load_trajectory_checkpoints(folder) for name, folder in trajectory_dirs.items()}
    finals = {name: read_adapter(read_trajectory(folder).adapter_dir)[0] for name, folder in trajectory_dirs.items()}
    result: dict[str, Any] = {"categories": adapter_report(draws, checkpoints, finals)}
    if generator_path is not None:
        if task_vector_paths is None:
            raise ValueError("generator_diagnostics: latent usage needs the task vectors")
        dataset, _ = generator_training_data(trajectory_dirs, task_vector_paths)
        result["latent"] = latent_usage(load_generator(generator_path), dataset.weights, dataset.conds)
    write_json(out_path, result)
    return result
