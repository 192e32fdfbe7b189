"""How category text is split and cut into token blocks."""

from __future__ import annotations

from pydantic import Field

from icm_core.infra.config import StageConfig


class DataConfig(StageConfig):
    """How category text is split and cut into token blocks."""

    seq_len: int = Field(128, ge=8, le=32768, description="Tokens per training / evaluation block.")
    val_fraction: float = Field(0.1, gt=0, lt=0.5, description="Share of each category's documents for validation.")
    test_fraction: float = Field(0.15, gt=0, lt=0.5, description="Share of documents held out for testing.")
    max_chars: int = Field(
        400_000, ge=1000, description="Cap on characters read per category (keeps demo runs small)."
    )
    min_chars: int = Field(
        2000, ge=100, description="A category with fewer characters than this is rejected as too small."
    )
    split_seed: int = Field(0, description="Seed of the deterministic document shuffle before splitting.")
