"""The per-category LoRA fine-tune's config."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from icm_core.infra.config import StageConfig


class LoraTrainConfig(StageConfig):
    """LoRA fine-tuning of one category, and which checkpoints form its trajectory."""

    rank: int = Field(2, ge=1, le=1024, description="LoRA rank r.")
    alpha: float = Field(8.0, gt=0, description="LoRA alpha (scaling = alpha / r). The official code uses 8.")
    dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout.")
    target_modules: tuple[str, ...] = Field(
        ("q_proj", "v_proj"), min_length=1, description="Module names that get LoRA adapters."
    )
    last_n_layers: int | None = Field(
        8,
        ge=1,
        description="Adapt only the last N transformer layers (peft layers_to_transform); None adapts all layers. "
        "Fewer layers train faster on CPU because the backward pass stops early.",
    )
    steps: int = Field(
        40,
        ge=1,
        description="Optimizer steps. 40: in a 50-step run on the demo's news text the validation NLL falls from "
        "3.7691 (base) to 3.6573 at step 40 and 3.6553 at step 50, so the last 10 steps buy 1.8% of the gain "
        "for 20% of the fine-tune's time (scripts/budget_curves.py, docs/evaluation.md).",
    )
    batch_size: int = Field(4, ge=1, description="Blocks per step.")
    lr: float = Field(3e-3, gt=0, description="AdamW peak learning rate (after warmup, cosine decay).")
    final_lr_ratio: float = Field(
        0.05, ge=0, le=1, description="Learning rate at the last step as a share of lr (end of the cosine decay)."
    )
    warmup_steps: int = Field(5, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    trajectory_size: int = Field(
        10, ge=1, description="How many checkpoints from the end of training to keep (the generator's data)."
    )
    checkpoint_every: int = Field(1, ge=1, description="Steps between trajectory checkpoints.")
    seed: int = Field(0, description="Seed for LoRA initialisation, dropout and batch order.")

    @model_validator(mode="after")
    def _trajectory_fits(self) -> LoraTrainConfig:
        return check_trajectory_fits(self)


def check_trajectory_fits(cfg: Any) -> Any:
    """A trajectory of ``cfg.trajectory_size`` checkpoints, ``cfg.checkpoint_every`` steps apart, must end within the
    fine-tune's ``cfg.steps`` (every LoRA config validates this: the language and the detection one)."""
    if cfg.trajectory_size * cfg.checkpoint_every > cfg.steps:
        raise ValueError(
            f"trajectory_size * checkpoint_every = {cfg.trajectory_size * cfg.checkpoint_every} exceeds "
            f"steps = {cfg.steps}"
        )
    return cfg
