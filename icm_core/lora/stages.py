"""The LoRA stages over artifact folders: a category's fine-tune, and the mean of its own trajectory."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from icm_core.data.config import DataConfig
from icm_core.data.splits import read_splits
from icm_core.data.tokens import token_blocks
from icm_core.infra.resume import Resumer
from icm_core.lora.adapters import (
    adapter_sha256,
    write_adapter,
)
from icm_core.lora.config import LoraTrainConfig
from icm_core.lora.train import train_lora
from icm_core.lora.trajectory import load_trajectory_checkpoints, read_trajectory
from icm_core.models.base_model import (
    adapter_base_reference,
    load_base_model,
    load_tokenizer,
)
from icm_core.models.config import ModelConfig


def finetune_lora(
    data_dir: str | Path,
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
    lora_cfg: LoraTrainConfig,
    out: str | Path,
    on_step=None,
    resume: Resumer | None = None,
) -> dict[str, Any]:
    """Fine-tune a LoRA adapter on a category's train split; save its trajectory and final adapter
    (``resume``: where to save resumable state and continue from, ``icm_core.infra.resume``)."""
    tokenizer = load_tokenizer(model_cfg)
    blocks = token_blocks(read_splits(data_dir).train, tokenizer, data_cfg.seq_len)
    base = load_base_model(model_cfg)
    started = time.perf_counter()
    trajectory = train_lora(
        base, blocks, lora_cfg, out, adapter_base_reference(model_cfg), on_step=on_step, resume=resume
    )
    return {**trajectory.summary(), "train_blocks": int(blocks.shape[0]), "seconds": time.perf_counter() - started}


def trajectory_mean_adapter(trajectory_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Reference point: the coordinate-wise mean of a category's own trajectory checkpoints (A and B averaged
    separately), written as an adapter with the trajectory's config. This is what a lookup table keyed by
    category would serve, and what COND P-DIFF's per-task statistics store (``norm.mean``)."""
    trajectory = read_trajectory(trajectory_dir)
    checkpoints = load_trajectory_checkpoints(trajectory_dir)
    state = {key: torch.stack([c[key].float() for c in checkpoints]).mean(0) for key in checkpoints[0]}
    write_adapter(out_dir, state, trajectory.adapter_config)
    return {
        "adapter_dir": str(out_dir),
        "adapter_sha256": adapter_sha256(out_dir),
        "sources": [Path(f).name for f in trajectory.files],
    }
