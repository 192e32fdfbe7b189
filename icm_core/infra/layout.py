"""Where each stage's artifacts live under an artifacts root.

``<root>/<stage>/<category>/<key>/`` where ``key`` is a short fingerprint of everything that
determines the stage's output (its config, its inputs' hashes, the icm_core version). Changing a
config writes to a new folder instead of overwriting what other runs may still be reading.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from icm_core.data.names import validate_category_name


STAGES = (
    "data",
    "lora",
    "task_vectors",
    "generator",
    "adapters",
    "soup",
    "trajectory_mean",
    "pdiff",
    "pdiff_adapters",
    "eval",
    "diagnostics",
    "report",
    "ablation_report",
    "zeroshot_pooled",
    "zeroshot_library",
    "zeroshot_adapters",
    "zeroshot_selector",
)


def stage_dir(root: str | Path, stage: str, key: str, category: str | None = None) -> Path:
    """Folder of one stage output; ``category`` is validated so it can never escape the root."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}")
    parts = [Path(root), stage]
    if category is not None:
        parts.append(validate_category_name(category, "category"))
    return Path(*parts, key[:16])


class StageOutput(Protocol):
    """One finished stage output as readers see it: its folder on this machine and the metadata its manifest
    records (``tasks.artifacts.ArtifactRef`` is one). Reports take these, so they need no orchestration types."""

    @property
    def folder(self) -> Path: ...

    @property
    def meta(self) -> dict[str, Any]: ...

    def file(self, name: str) -> Path: ...
