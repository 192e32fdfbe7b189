"""The generator's stages over artifact folders: task vectors, training the CVAE, sampling an adapter."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from icm_core.data.categories import Category
from icm_core.data.config import DataConfig
from icm_core.data.splits import read_splits
from icm_core.data.tokens import sample_blocks, token_blocks
from icm_core.generator.config import CVAEConfig, SampleConfig, TaskVectorConfig
from icm_core.generator.dataset import generator_training_data, trained_on
from icm_core.generator.generator import load_generator, save_generator
from icm_core.generator.task_vectors import (
    TextEncoder,
    hidden_state_task_vector,
    task_vector_kind,
    text_task_vector,
    vector_config,
    vector_kinds,
)
from icm_core.generator.train import train_generator
from icm_core.generator.validation import validation_scorer
from icm_core.infra.io import save_tensors
from icm_core.infra.resume import Resumer
from icm_core.lora.adapters import (
    adapter_sha256,
    load_adapter,
    write_adapter,
)
from icm_core.lora.trajectory import final_lora_state, read_trajectory
from icm_core.models.base_model import (
    base_model_names,
    load_base_model,
    load_tokenizer,
)
from icm_core.models.config import ModelConfig


def compute_task_vector(
    category: Category,
    data_dir: str | Path,
    trajectory_dir: str | Path | None,
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
    tv_cfg: TaskVectorConfig,
    out_path: str | Path,
) -> dict[str, Any]:
    """Compute a category's task vector (Eq. 1 on train samples, or its description embedding); the sidecar
    records the vector's kind (:func:`~icm_core.generator.task_vectors`)."""
    kind = task_vector_kind(tv_cfg, model_cfg.name_or_path)
    if tv_cfg.source == "description":
        encoder = TextEncoder(tv_cfg.text_encoder, trust_remote_code=tv_cfg.text_encoder_trust_remote_code)
        vector = text_task_vector(category.description, encoder)
    else:
        tokenizer = load_tokenizer(model_cfg)
        # Samples come from the train split only: test text never shapes the condition.
        blocks = token_blocks(read_splits(data_dir).train, tokenizer, tv_cfg.sample_tokens)
        blocks = sample_blocks(blocks, tv_cfg.num_samples, tv_cfg.seed)
        model = load_base_model(model_cfg)
        if tv_cfg.hidden_from == "finetuned":
            if trajectory_dir is None:
                raise ValueError("task_vector.hidden_from='finetuned' needs the category's trajectory")
            model = load_adapter(model, read_trajectory(trajectory_dir).adapter_dir, base_model_names(model_cfg))
        vector = hidden_state_task_vector(model, blocks)
    digest = save_tensors(
        out_path,
        {"task_vector": vector},
        {"category": category.name, "config": tv_cfg.model_dump(mode="json"), "kind": kind},
    )
    return {"path": str(out_path), "sha256": digest, "dim": int(vector.shape[0]), "kind": kind}


def train_generator_stage(
    trajectory_dirs: dict[str, str | Path],
    task_vector_paths: dict[str, str | Path],
    cvae_cfg: CVAEConfig,
    out_path: str | Path,
    device: str = "cpu",
    on_epoch=None,
    resume: Resumer | None = None,
    validation: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train one CVAE on the trajectories of all categories and save the generator artifact.

    ``validation``: ``{"split_dirs": {category: splits folder}, "model_cfg": ..., "data_cfg": ...}``; with it
    (and ``cvae_cfg.val_every > 0``) training stops early on the generated adapters' validation scores
    (``cvae_cfg.val_criterion``; the worst-gap criterion scores the base model and each final LoRA once first)."""
    dataset, first = generator_training_data(trajectory_dirs, task_vector_paths)
    kind = vector_kinds(task_vector_paths)
    score = None
    if validation is not None and cvae_cfg.val_every > 0:
        score = validation_scorer(
            validation["split_dirs"],
            validation["model_cfg"],
            validation["data_cfg"],
            cvae_cfg.val_tokens,
            first,
            criterion=cvae_cfg.val_criterion,
        )
        if score is not None and cvae_cfg.val_criterion == "worst_gap":
            score.with_reference({name: final_lora_state(trajectory_dirs[name]) for name in score.blocks})
    generator, history, seconds = train_generator(
        dataset, cvae_cfg, first, device=device, on_epoch=on_epoch, resume=resume, score_adapters=score
    )
    extra: dict[str, Any] = {"history": history}
    if kind is not None:
        extra["task_vector_kind"] = kind
    tv_config = vector_config(task_vector_paths)
    if tv_config is not None:
        extra["task_vector_config"] = tv_config
    digest = save_generator(out_path, generator, extra)
    return {
        **trained_on(out_path, digest, dataset),
        "final_recon": history[-1]["recon"],
        "epochs_run": len(history),
        "best_epoch": next((row["epoch"] for row in history if row.get("best")), None),
        "seconds": seconds,
    }


def sample_adapter(
    generator_path: str | Path,
    out_dir: str | Path,
    sample_cfg: SampleConfig,
    category: str | None = None,
    task_vector: torch.Tensor | None = None,
    task_vector_source: str | Path | None = None,
    base_model: str | None = None,
    task_vector_kind: str | None = None,
) -> dict[str, Any]:
    """Generate an adapter folder for a known category or for a given task vector (``task_vector_source``,
    its file, is named in errors; a ``task_vector_kind`` other than the generator's is refused). ``base_model``
    replaces the ``base_model_name_or_path`` the generator's training adapters recorded (e.g. a hub id before
    publishing)."""
    generator = load_generator(generator_path)
    started = time.perf_counter()
    if task_vector is not None:
        where = task_vector_source or "task vector"
        state = generator.generate(task_vector, sample_cfg, where=where, kind=task_vector_kind)
    elif category is not None:
        state = generator.generate_for(category, sample_cfg)
    else:
        raise ValueError("sample_adapter needs a category or a task vector")
    seconds = time.perf_counter() - started
    adapter_config = dict(generator.adapter_config)
    if base_model:
        adapter_config["base_model_name_or_path"] = base_model
    write_adapter(out_dir, state, adapter_config)
    return {"adapter_dir": str(out_dir), "adapter_sha256": adapter_sha256(out_dir), "seconds": seconds}
