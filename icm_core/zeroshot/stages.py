"""The leave-out protocol's stages over artifact folders (what ``tasks/zeroshot.py`` wraps; no Prefect here)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from icm_core.data.config import DataConfig
from icm_core.data.splits import CategorySplits, read_split, read_splits, write_splits
from icm_core.generator.config import SampleConfig, TaskVectorConfig
from icm_core.generator.generator import load_generator
from icm_core.generator.task_vectors import load_task_vector_with_kind
from icm_core.lora.adapters import adapter_sha256, read_adapter, write_adapter
from icm_core.lora.arithmetic import weighted_delta_adapter
from icm_core.lora.trajectory import read_trajectory
from icm_core.models.base_model import load_base_model, load_tokenizer, shared_base_model
from icm_core.models.config import ModelConfig
from icm_core.zeroshot.config import SelectorConfig
from icm_core.zeroshot.functional import FunctionalConfig
from icm_core.zeroshot.protocol import knn_weights
from icm_core.zeroshot.selector import select_adapter
from icm_core.zeroshot.serving import library_candidates, sample_text_blocks, write_selection


def pool_splits(data_dirs: Mapping[str, str | Path], out: str | Path) -> dict[str, Any]:
    """Pool several categories' splits (train with train, val with val, test with test; categories in sorted
    order) into one split folder: the multi-task LoRA's training text. ``sources`` records which categories."""
    parts = {"train": [], "val": [], "test": []}
    for name in sorted(data_dirs):
        splits = read_splits(data_dirs[name])
        for key, docs in splits.as_dict().items():
            parts[key].extend(docs)
    summary = write_splits(CategorySplits(**parts), out)
    return {"sources": sorted(data_dirs), **summary}


def library_adapter(
    method: str,
    trajectory_dirs: Mapping[str, str | Path],
    vector_paths: Mapping[str, str | Path],
    query_path: str | Path | None,
    out_dir: str | Path,
    k: int = 1,
    temperature: float | None = None,
) -> dict[str, Any]:
    """An adapter built from the training categories' final LoRAs, as an exact weighted mean of weight deltas.

    ``method='mean_lora'`` weights every training category equally; ``'nn1'`` takes the nearest category to
    the query vector by cosine; ``'knn_softmax'`` softmax-weights the ``k`` nearest with ``temperature``.
    """
    names = sorted(trajectory_dirs)
    if method == "mean_lora":
        weights = {name: 1 / len(names) for name in names}
    else:
        if query_path is None:
            raise ValueError(f"{method}: needs the held-out category's task vector")
        query = load_task_vector_with_kind(query_path)[0]
        keys = {name: load_task_vector_with_kind(vector_paths[name])[0] for name in names}
        weights = knn_weights(query, keys, 1 if method == "nn1" else k, None if method == "nn1" else temperature)
    chosen = sorted(weights)
    adapters = [read_adapter(read_trajectory(trajectory_dirs[n]).adapter_dir) for n in chosen]
    state, config = weighted_delta_adapter(adapters, [weights[n] for n in chosen])
    write_adapter(out_dir, state, config)
    return {"adapter_sha256": adapter_sha256(out_dir), "weights": weights, "rank": int(config["r"])}


def vector_adapter(
    generator_path: str | Path, vector_paths: list[str | Path], out_dir: str | Path, sample_cfg: SampleConfig
) -> dict[str, Any]:
    """Generate an adapter from a task vector file, or from the mean of several (the mean-condition control).
    The vectors' recorded kind must match the generator's."""
    generator = load_generator(generator_path)
    loaded = [load_task_vector_with_kind(p) for p in vector_paths]
    kinds = {kind for _, kind in loaded if kind is not None}
    if len(kinds) > 1:
        raise ValueError(f"task vectors of different kinds {sorted(kinds)}: {[str(p) for p in vector_paths]}")
    vector = torch.stack([v.float() for v, _ in loaded]).mean(0)
    started = time.perf_counter()
    state = generator.generate(vector, sample_cfg, where=str(vector_paths[0]), kind=next(iter(kinds), None))
    write_adapter(out_dir, state, generator.adapter_config)
    return {
        "adapter_sha256": adapter_sha256(out_dir),
        "seconds": time.perf_counter() - started,
        "generator_categories": list(generator.meta.get("categories", [])),
    }


def functional_generator(
    generator_path: str | Path,
    trajectory_dirs: Mapping[str, str | Path],
    vector_paths: Mapping[str, str | Path],
    data_dirs: Mapping[str, str | Path],
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
    cfg: FunctionalConfig,
    out_path: str | Path,
    on_step=None,
) -> dict[str, Any]:
    """Copy of a fold's generator whose decoder is fine-tuned on the functional loss over the same training
    categories' text (:mod:`icm_core.zeroshot.functional`); saved like any generator (kind and categories kept)."""
    from icm_core.data.tokens import token_blocks
    from icm_core.generator.dataset import generator_training_data
    from icm_core.generator.generator import save_generator
    from icm_core.zeroshot.functional import functional_finetune

    generator = load_generator(generator_path)
    dataset, _ = generator_training_data(dict(trajectory_dirs), dict(vector_paths))
    if sorted(dataset.task_vectors) != sorted(generator.task_vectors):
        raise ValueError(
            f"{generator_path}: trained on {sorted(generator.task_vectors)}, given {sorted(dataset.task_vectors)}"
        )
    tokenizer = load_tokenizer(model_cfg)
    blocks = {n: token_blocks(read_splits(data_dirs[n]).train, tokenizer, data_cfg.seq_len) for n in data_dirs}
    base = load_base_model(model_cfg)
    started = time.perf_counter()
    history = functional_finetune(generator, dataset, base, blocks, cfg, on_step=on_step)
    meta = {k: v for k, v in generator.meta.items() if k in ("history", "task_vector_kind")}
    digest = save_generator(out_path, generator, {**meta, "functional": history, "functional_config": vars(cfg)})
    return {"path": str(out_path), "sha256": digest, "seconds": time.perf_counter() - started,
            "final_lm": history[-1]["lm"] if history else None}  # fmt: skip


def selector_adapter(
    data_dir: str | Path,
    stored: Mapping[str, tuple[str, str | Path]],
    categories: Mapping[str, str | Path],
    generators: Mapping[str, str | Path],
    query_path: str | Path | None,
    model_cfg: ModelConfig,
    tv_cfg: TaskVectorConfig,
    cfg: SelectorConfig,
    out_dir: str | Path,
    finetune_from: str | None = "multitask_lora",
    mean: bool = False,
) -> dict[str, Any]:
    """The selector method of the leave-out protocol for one held-out category: its candidates are the fold's
    library (``stored``: multi-task, mean and k-NN adapters; ``categories``: the training categories' own LoRAs;
    ``generators``), scored on the k sample blocks of the category's **train** split that its task vector averages.
    Only the train split is read (:func:`~icm_core.data.splits.read_split`): never validation or test text.
    ``query_path`` None (no text-computable vector): no generator candidates. ``mean``: add the mean of the
    categories' LoRAs (the registry, which stores no mean LoRA)."""
    started = time.perf_counter()
    blocks = sample_text_blocks(read_split(data_dir, "train"), load_tokenizer(model_cfg), tv_cfg)
    query, kind = load_task_vector_with_kind(query_path) if query_path is not None else (None, None)
    candidates = library_candidates(stored, categories, {}, generators, query, kind, cfg.draws, mean=mean)
    with shared_base_model(model_cfg) as model:
        selection = select_adapter(model, blocks, candidates, cfg, finetune_from=finetune_from)
    record = write_selection(out_dir, selection, samples=int(blocks.shape[0]))
    return {"winner": record["winner"], "winner_kind": record["winner_kind"], "scores": record["scores"],
            "adapter_sha256": adapter_sha256(out_dir), "seconds": time.perf_counter() - started}  # fmt: skip
