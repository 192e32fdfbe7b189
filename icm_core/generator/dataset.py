"""The generators' training set: every category's trajectory checkpoints, flattened, paired with its task vector."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from icm_core.generator.task_vectors import load_task_vector
from icm_core.lora.flatten import (
    LoraLayout,
    check_layout,
    flatten_lora,
    lora_layout,
)
from icm_core.lora.trajectory import load_trajectory_checkpoints, read_trajectory


@dataclass
class GeneratorDataset:
    """Flattened checkpoints [N, L], their conditions [N, C] and which category each row belongs to."""

    weights: torch.Tensor
    conds: torch.Tensor
    row_category: list[str]
    layout: LoraLayout
    task_vectors: dict[str, torch.Tensor]


def build_dataset(
    checkpoints: Mapping[str, Sequence[Mapping[str, torch.Tensor]]],
    task_vectors: Mapping[str, torch.Tensor],
    sources: Mapping[str, Sequence[str | Path]] | None = None,
) -> GeneratorDataset:
    """Flatten every checkpoint of every category; all must share one layout (same keys and ranks).
    ``sources`` (the checkpoint files, per category) names the offending file in errors."""
    if not checkpoints:
        raise ValueError("no categories: the generator needs at least one trajectory")
    missing = sorted(set(checkpoints) - set(task_vectors))
    if missing:
        raise ValueError(f"no task vector for categories {missing}")
    names = sorted(checkpoints)
    empty = [name for name in names if not checkpoints[name]]
    if empty:
        raise ValueError(f"category {empty[0]!r}: empty trajectory")
    layout = lora_layout(checkpoints[names[0]][0])
    dims = {name: tuple(task_vectors[name].shape) for name in names}
    if len(set(dims.values())) != 1 or len(next(iter(dims.values()))) != 1:
        raise ValueError(f"task vectors must all be 1-D of one size, got {dims}")
    rows, conds, owners = [], [], []
    for name in names:
        if not checkpoints[name]:
            raise ValueError(f"category {name!r}: empty trajectory")
        for i, state in enumerate(checkpoints[name]):
            where = f"category {name!r} checkpoint {i}"
            if sources is not None:
                where = f"{sources[name][i]} ({where})"
            check_layout(state, layout, where=where)
            rows.append(flatten_lora(state, layout)[0])
            conds.append(task_vectors[name].float())
            owners.append(name)
    vectors = {name: task_vectors[name].float() for name in names}
    return GeneratorDataset(torch.stack(rows), torch.stack(conds), owners, layout, vectors)


def generator_training_data(
    trajectory_dirs: dict[str, str | Path], task_vector_paths: dict[str, str | Path]
) -> tuple[GeneratorDataset, dict[str, Any]]:
    """The data both generators (ICM-LoRA's CVAE and COND P-DIFF) train on: every category's trajectory
    checkpoints paired with its task vector, and the adapter config of the first category."""
    checkpoints = {name: load_trajectory_checkpoints(folder) for name, folder in trajectory_dirs.items()}
    vectors = {name: load_task_vector(path) for name, path in task_vector_paths.items()}
    trajectories = {name: read_trajectory(folder) for name, folder in trajectory_dirs.items()}
    files = {name: [t.folder / f for f in t.files] for name, t in trajectories.items()}  # named in layout errors
    dataset = build_dataset(checkpoints, vectors, sources=files)
    return dataset, next(iter(trajectories.values())).adapter_config


def trained_on(path: str | Path, digest: str, dataset: GeneratorDataset) -> dict[str, Any]:
    """What a generator stage reports about the artifact it saved and the data it was trained on (the CVAE's and
    COND P-DIFF's stages alike)."""
    return {
        "path": str(path),
        "sha256": digest,
        "bytes": Path(path).stat().st_size,
        "num_checkpoints": int(dataset.weights.shape[0]),
        "flat_length": dataset.layout.total,
    }
