"""A LoRA trajectory folder: the last checkpoints of a fine-tune (the generator's data) and its final adapter."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from icm_core.infra.io import (
    ArtifactError,
    load_tensors,
    read_json,
    verify_file,
)
from icm_core.lora.adapters import adapter_sha256, read_adapter


TRAJECTORY_INDEX = "trajectory.json"


@dataclass(frozen=True)
class Trajectory:
    """Index of a saved trajectory."""

    folder: Path
    steps: list[int]
    files: list[str]
    sha256: list[str]
    adapter_config: dict[str, Any]
    losses: list[float]

    @property
    def adapter_dir(self) -> Path:
        return self.folder / "adapter"

    def summary(self) -> dict[str, Any]:
        """What a fine-tune stage reports about its trajectory (the language and the detection one)."""
        return {
            "folder": str(self.folder),
            "adapter_dir": str(self.adapter_dir),
            "adapter_sha256": adapter_sha256(self.adapter_dir),
            "checkpoints": self.files,
            "first_loss": self.losses[0],
            "final_loss": self.losses[-1],
        }


def read_trajectory(folder: str | Path) -> Trajectory:
    """Read a trajectory index (checkpoints in numeric step order)."""
    folder = Path(folder)
    index = read_json(folder / TRAJECTORY_INDEX)
    order = sorted(range(len(index["steps"])), key=lambda i: int(index["steps"][i]))
    return Trajectory(
        folder=folder,
        steps=[int(index["steps"][i]) for i in order],
        files=[index["files"][i] for i in order],
        sha256=[index["sha256"][i] for i in order],
        adapter_config=index["adapter_config"],
        losses=list(index.get("losses", [])),
    )


def load_trajectory_checkpoints(folder: str | Path) -> list[dict[str, torch.Tensor]]:
    """Load every checkpoint of a trajectory, verifying each file's sha256 against the index."""
    trajectory = read_trajectory(folder)
    checkpoints = []
    for name, digest in zip(trajectory.files, trajectory.sha256, strict=True):
        path = trajectory.folder / name
        verify_file(path, digest)
        tensors, _ = load_tensors(path, verify=False)
        for key, tensor in tensors.items():
            if not bool(torch.isfinite(tensor).all()):
                raise ArtifactError(f"{path}: tensor {key!r} contains NaN or Inf")
        checkpoints.append(tensors)
    return checkpoints


def final_lora_state(trajectory_dir: str | Path) -> dict[str, torch.Tensor]:
    """The LoRA state of a fine-tune's final adapter (the one evaluated as the category's LoRA)."""
    return read_adapter(read_trajectory(trajectory_dir).adapter_dir)[0]
