"""Configs of the evaluation: PPL / BPC on held-out text, and the generator diagnostics."""

from __future__ import annotations

from pydantic import Field

from icm_core.infra.config import StageConfig


class EvalConfig(StageConfig):
    """Perplexity / bits-per-character evaluation on held-out test text."""

    max_tokens: int = Field(
        2048,
        ge=16,
        description="Test tokens scored per category: max_tokens // seq_len blocks spread evenly over the test split "
        "(the whole split when it is smaller). 2048 = 16 blocks of 128: the one-seed demo's budget, which keeps "
        "a cold `make demo` inside its time limit; the committed multi-seed table (`make results`) scores 4096 "
        "(docs/evaluation.md: interval widths vs budget).",
    )
    batch_size: int = Field(8, ge=1, description="Blocks per forward pass.")


class DiagnosticsConfig(StageConfig):
    """What the report measures about the generators beyond their scored adapter."""

    z_draws: int = Field(
        2,
        ge=1,
        le=32,
        description="Draws z per category and generator (sample.seed, +1, ...; the first is the scored adapter): "
        "spread of the generated weights, distance to the training checkpoints. 1 turns the spread off.",
    )
    score_z_draws: bool = Field(
        False,
        description="Also score the extra ICM-LoRA draws on the test blocks (spread of PPL across z draws). Off "
        "by default to keep the one-seed demo inside its time budget (each draw is one more evaluation per "
        "category); `make results` turns it on.",
    )
