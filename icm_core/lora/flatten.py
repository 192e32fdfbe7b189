"""Flatten LoRA state dicts into one vector and back, with a stored layout and normalisation statistics.

The layout (keys, shapes, offsets) is data, saved with the generator, so a generated vector can be
turned back into a PEFT state dict without any real checkpoint. Keys are ordered by a natural sort
(``layers.2`` before ``layers.10``), never as plain strings.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class TensorSpec:
    """Where one tensor lives in the flat vector."""

    key: str
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count


@dataclass(frozen=True)
class LoraLayout:
    """Ordered tensor specs; ``total`` is the flat vector's length."""

    specs: tuple[TensorSpec, ...]

    @property
    def total(self) -> int:
        last = self.specs[-1]
        return last.offset + last.numel

    @property
    def keys(self) -> list[str]:
        return [spec.key for spec in self.specs]

    def to_json(self) -> list[dict[str, Any]]:
        return [{"key": s.key, "shape": list(s.shape), "offset": s.offset} for s in self.specs]

    @classmethod
    def from_json(cls, rows: Sequence[Mapping[str, Any]]) -> LoraLayout:
        return cls(tuple(TensorSpec(r["key"], tuple(int(d) for d in r["shape"]), int(r["offset"])) for r in rows))


def natural_key(text: str) -> list[Any]:
    """Sort key that orders embedded integers numerically: 'layers.2' < 'layers.10', 'epoch_2' < 'epoch_10'."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def lora_layout(state_dict: Mapping[str, torch.Tensor]) -> LoraLayout:
    """Layout of a LoRA state dict, keys in natural order."""
    if not state_dict:
        raise ValueError("empty LoRA state dict: nothing to flatten")
    specs, offset = [], 0
    for key in sorted(state_dict, key=natural_key):
        shape = tuple(state_dict[key].shape)
        specs.append(TensorSpec(key, shape, offset))
        offset += specs[-1].numel
    return LoraLayout(tuple(specs))


def check_layout(state_dict: Mapping[str, torch.Tensor], layout: LoraLayout, where: str = "state dict") -> None:
    """Raise ValueError naming the first key that is missing, extra, or has another shape."""
    expected = {spec.key: spec.shape for spec in layout.specs}
    missing = sorted(set(expected) - set(state_dict), key=natural_key)
    extra = sorted(set(state_dict) - set(expected), key=natural_key)
    if missing or extra:
        raise ValueError(
            f"{where}: LoRA keys differ from the layout (missing {missing[:3]}, unexpected {extra[:3]}); "
            "were the checkpoints trained with different target modules or layers?"
        )
    for key, shape in expected.items():
        if tuple(state_dict[key].shape) != shape:
            raise ValueError(
                f"{where}: {key} has shape {tuple(state_dict[key].shape)}, layout says {shape}; "
                "were the checkpoints trained with different LoRA ranks?"
            )


def flatten_lora(
    state_dict: Mapping[str, torch.Tensor], layout: LoraLayout | None = None
) -> tuple[torch.Tensor, LoraLayout]:
    """Concatenate the tensors (float32) in layout order into one 1-D vector."""
    layout = layout or lora_layout(state_dict)
    check_layout(state_dict, layout)
    flat = torch.cat([state_dict[spec.key].detach().reshape(-1).to(torch.float32).cpu() for spec in layout.specs])
    return flat, layout


def unflatten_lora(vector: torch.Tensor, layout: LoraLayout) -> dict[str, torch.Tensor]:
    """Inverse of :func:`flatten_lora`: exact, returns contiguous tensors keyed as in the layout."""
    if vector.dim() != 1 or vector.numel() != layout.total:
        raise ValueError(f"vector of shape {tuple(vector.shape)} does not match layout length {layout.total}")
    return {
        spec.key: vector[spec.offset : spec.offset + spec.numel].reshape(spec.shape).clone() for spec in layout.specs
    }


@dataclass(frozen=True)
class NormStats:
    """Normalisation statistics computed over all training checkpoints of all categories and stored with
    the generator, so generation needs no real checkpoint.

    * ``mean`` / ``std``: one per layout key (per-tensor z-score, as in the official code);
    * ``center``: optional per-coordinate mean [L] subtracted first ("coordinate" normalisation). LoRA
      A matrices start from one shared random initialisation; centring removes that shared part, so
      the CVAE models what distinguishes checkpoints and categories instead of memorising a random
      vector. It costs one checkpoint's worth of storage, counted in the generator's size.
    """

    mean: torch.Tensor  # [num_keys]
    std: torch.Tensor  # [num_keys]
    center: torch.Tensor | None = None  # [L]

    def expand(self, layout: LoraLayout) -> tuple[torch.Tensor, torch.Tensor]:
        sizes = torch.tensor([spec.numel for spec in layout.specs])
        mean = self.mean.repeat_interleave(sizes)
        if self.center is not None:
            mean = mean + self.center
        return mean, self.std.repeat_interleave(sizes)


def fit_norm_stats(vectors: torch.Tensor, layout: LoraLayout, center: bool = False, eps: float = 1e-8) -> NormStats:
    """Per-key mean and std over all rows of ``vectors`` [N, L], after removing the per-coordinate
    mean when ``center``."""
    vectors = vectors.to(torch.float64)
    center_vec = vectors.mean(0) if center else None
    if center_vec is not None:
        vectors = vectors - center_vec
    means, stds = [], []
    for spec in layout.specs:
        block = vectors[:, spec.offset : spec.offset + spec.numel]
        means.append(block.mean())
        stds.append(block.std(unbiased=False).clamp_min(eps))
    return NormStats(
        torch.stack(means).float(), torch.stack(stds).float(), None if center_vec is None else center_vec.float()
    )


def normalize(vectors: torch.Tensor, stats: NormStats, layout: LoraLayout) -> torch.Tensor:
    mean, std = stats.expand(layout)
    return (vectors - mean) / std


def denormalize(vectors: torch.Tensor, stats: NormStats, layout: LoraLayout) -> torch.Tensor:
    mean, std = stats.expand(layout)
    return vectors * std + mean
