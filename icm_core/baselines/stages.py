"""The baselines' stages over artifact folders: Model Soup, and COND P-DIFF's training and sampling."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from icm_core.baselines.config import PDiffConfig, SoupConfig
from icm_core.baselines.pdiff import load_pdiff, save_pdiff, train_pdiff
from icm_core.baselines.soup import model_soup
from icm_core.generator.config import SampleConfig
from icm_core.generator.dataset import generator_training_data, trained_on
from icm_core.infra.resume import Resumer
from icm_core.lora.adapters import (
    adapter_sha256,
    read_adapter,
    write_adapter,
)
from icm_core.lora.trajectory import load_trajectory_checkpoints, read_trajectory


def soup_adapter(trajectory_dirs: dict[str, str | Path], soup_cfg: SoupConfig, out_dir: str | Path) -> dict[str, Any]:
    """Model Soup: write the uniform average (over weight deltas) of adapters as one PEFT adapter folder.

    ``scope='all_categories'`` averages the final adapter of every category in ``trajectory_dirs``;
    ``scope='trajectory'`` averages the trajectory checkpoints of the single category given.
    """
    if soup_cfg.scope == "trajectory":
        if len(trajectory_dirs) != 1:
            raise ValueError(
                f"soup.scope='trajectory' averages one category's checkpoints, got {sorted(trajectory_dirs)}"
            )
        [(name, folder)] = trajectory_dirs.items()
        trajectory = read_trajectory(folder)
        adapters = [(state, trajectory.adapter_config) for state in load_trajectory_checkpoints(folder)]
        sources = [f"{name}/{Path(f).name}" for f in trajectory.files]
    else:
        adapters = [
            read_adapter(read_trajectory(trajectory_dirs[name]).adapter_dir) for name in sorted(trajectory_dirs)
        ]
        sources = [f"{name}/adapter" for name in sorted(trajectory_dirs)]
    state, config = model_soup(adapters, soup_cfg.max_rank)
    write_adapter(out_dir, state, config)
    return {
        "adapter_dir": str(out_dir),
        "adapter_sha256": adapter_sha256(out_dir),
        "rank": int(config["r"]),
        "sources": sources,
    }


def train_pdiff_stage(
    trajectory_dirs: dict[str, str | Path],
    task_vector_paths: dict[str, str | Path],
    pdiff_cfg: PDiffConfig,
    out_path: str | Path,
    device: str = "cpu",
    on_progress=None,
    resume: Resumer | None = None,
) -> dict[str, Any]:
    """Train the COND P-DIFF baseline on the same checkpoints and task vectors as the CVAE."""
    dataset, first = generator_training_data(trajectory_dirs, task_vector_paths)
    model, history, seconds = train_pdiff(
        dataset, pdiff_cfg, first, device=device, on_progress=on_progress, resume=resume
    )
    digest = save_pdiff(out_path, model, {"history": history})
    return {
        **trained_on(out_path, digest, dataset),
        "final_ae_recon": history["autoencoder"][-1]["recon"],
        "final_ddpm_loss": history["ddpm"][-1]["loss"],
        "seconds": seconds,
    }


def sample_pdiff_states(
    pdiff_path: str | Path, sample_cfg: SampleConfig, categories: list[str]
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any], float]:
    """COND P-DIFF's LoRA states for ``categories`` from one batched denoising pass (T steps for all of them,
    then decode and de-normalise), the PEFT adapter config to write them with, and the sampling seconds."""
    model = load_pdiff(pdiff_path)
    started = time.perf_counter()
    states = model.generate(categories, sample_cfg)
    return states, model.adapter_config, time.perf_counter() - started


def write_sampled_adapter(out_dir: str | Path, state: dict[str, torch.Tensor], adapter_config: dict[str, Any]) -> str:
    """Write one sampled LoRA state as a PEFT adapter folder; returns its content hash."""
    write_adapter(out_dir, state, adapter_config)
    return adapter_sha256(out_dir)
