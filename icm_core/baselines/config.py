"""Configs of the baselines: Model Soup and COND P-DIFF."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from icm_core.infra.config import StageConfig


class SoupConfig(StageConfig):
    """The Model Soup baseline: a uniform average of LoRA adapters, taken over their weight deltas."""

    scope: Literal["all_categories", "trajectory"] = Field(
        "all_categories",
        description="'all_categories': one soup of every category's final adapter, the same adapter for all "
        "tasks (a multi-task soup: one artifact for all tasks, like the generator). 'trajectory': per "
        "category, the soup of its own trajectory checkpoints (needs the real checkpoints at serve time).",
    )
    max_rank: int | None = Field(
        None, ge=1, description="Cap on the soup's LoRA rank; None keeps the exact average (rank <= sum of ranks)."
    )


class PDiffConfig(StageConfig):
    """The COND P-DIFF baseline: autoencoder + conditional latent DDPM (defaults follow the public code)."""

    fold_rate: int = Field(5, ge=2, description="Each autoencoder layer folds the sequence length by this factor.")
    ae_kernel_size: int = Field(5, ge=1, description="Kernel of the length-preserving autoencoder convs (odd).")
    ae_enc_channels: tuple[int, ...] = Field((4, 4, 4, 4), min_length=1, description="Encoder channels per layer.")
    ae_dec_channels: tuple[int, ...] = Field(
        (4, 64, 64, 8),
        min_length=1,
        description="Decoder channels per layer (first = last encoder channel). The public code's 'medium' plan is "
        "(4, 256, 256, 8), 16x the compute of the widest layers; the CPU demo uses 64.",
    )
    ae_input_noise: float = Field(0.001, ge=0, lt=1, description="Input noise augmentation factor.")
    ae_latent_noise: float = Field(0.1, ge=0, lt=1, description="Latent noise augmentation factor.")
    ae_epochs: int = Field(
        40,
        ge=1,
        description="Autoencoder training epochs over all checkpoints. 40: its reconstruction error flattens by "
        "epoch 30-40 (1.001 at 40 vs 0.984 at 100 on the demo, on per-task z-scored weights, so it reconstructs "
        "little beyond the stored per-task mean either way).",
    )
    ae_lr: float = Field(1e-3, gt=0, description="Autoencoder AdamW learning rate.")
    unet_channels: tuple[int, ...] = Field(
        (32, 64, 128, 256),
        min_length=1,
        description="Denoiser U-Net channels per resolution level. The public code uses (64, 128, 256, 512); the "
        "CPU demo halves each.",
    )
    cond_tokens: int = Field(
        8, ge=1, description="Sequence positions the projected condition occupies (concatenated to the latent)."
    )
    timesteps: int = Field(1000, ge=2, description="DDPM steps T.")
    beta_start: float = Field(1e-4, gt=0, lt=1, description="First beta of the linear schedule.")
    beta_end: float = Field(2e-2, gt=0, lt=1, description="Last beta of the linear schedule.")
    ddpm_steps: int = Field(
        500,
        ge=1,
        description="Denoiser optimizer steps. 500: the demo's COND P-DIFF adapters sit at the per-task mean its "
        "artifact stores whatever the denoiser learns (docs/evaluation.md), and its noise MSE falls only from "
        "0.17 (step 300) to 0.135 (step 1500) while costing ~2.5 min more on 2 CPU cores.",
    )
    ddpm_lr: float = Field(1e-3, gt=0, description="Denoiser AdamW learning rate.")
    batch_size: int = Field(16, ge=1, description="Checkpoints (or latents) per step.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay of both networks.")
    normalization: Literal["per_task", "shared"] = Field(
        "per_task",
        description="'per_task' (public code): z-score each coordinate over that task's checkpoints and store every "
        "task's mean and std in the artifact (the stored mean is that task's mean checkpoint). 'shared': one "
        "per-tensor z-score over all tasks' checkpoints, as the ICM-LoRA generator uses (no per-task statistics).",
    )
    norm_eps: float = Field(1e-8, gt=0, description="Floor of the per-coordinate std.")
    log_every: int = Field(100, ge=1, description="DDPM steps per history row / progress log.")
    seed: int = Field(2024, description="Seed of initialisation, noise and batches.")

    @model_validator(mode="after")
    def _consistent(self) -> PDiffConfig:
        if self.ae_kernel_size % 2 == 0:
            raise ValueError(f"ae_kernel_size: must be odd, got {self.ae_kernel_size}")
        if len(self.ae_dec_channels) != len(self.ae_enc_channels):
            raise ValueError("ae_dec_channels: must have as many layers as ae_enc_channels")
        if self.ae_dec_channels[0] != self.ae_enc_channels[-1]:
            raise ValueError("ae_dec_channels: the first entry must equal the last of ae_enc_channels")
        if self.beta_end <= self.beta_start:
            raise ValueError("beta_end: must be larger than beta_start")
        return self
