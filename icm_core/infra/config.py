"""Config plumbing every stage shares: the frozen base class, the config fingerprint, and how often long
stages save resumable state."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class StageConfig(BaseModel):
    """Base for stage configs: frozen, strict about unknown fields, hashable."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())


def config_fingerprint(*parts: Any) -> str:
    """Stable sha256 of configs and plain values (JSON with sorted keys)."""

    def plain(value: Any) -> Any:
        if isinstance(value, BaseModel):
            return value.model_dump(mode="json")
        if isinstance(value, Path):
            return str(value)
        return value

    text = json.dumps([plain(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class ResumeConfig(StageConfig):
    """Resumable state inside the long stages (``icm_core/infra/resume.py``). Saving state never changes a result,
    so these fields are not part of any cache key: changing them reuses every cached output. 0 turns saving
    off for that loop. The state lives next to the stage's output folder and is removed when the output is
    complete."""

    lora_every_steps: int = Field(25, ge=0, description="LoRA fine-tuning: optimizer steps between saved states.")
    cvae_every_epochs: int = Field(20, ge=0, description="CVAE generator training: epochs between saved states.")
    pdiff_every_epochs: int = Field(20, ge=0, description="COND P-DIFF autoencoder: epochs between saved states.")
    pdiff_every_steps: int = Field(250, ge=0, description="COND P-DIFF denoiser: DDPM steps between saved states.")
