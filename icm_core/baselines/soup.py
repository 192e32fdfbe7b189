"""Model Soup for LoRA: the uniform average of adapters, taken over their weight deltas (not over A and B
separately, see :mod:`icm_core.lora.arithmetic`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from icm_core.lora.arithmetic import weighted_delta_adapter


def model_soup(
    adapters: Sequence[tuple[Mapping[str, torch.Tensor], Mapping[str, Any]]], max_rank: int | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Uniform soup of LoRA adapters (state dict, adapter config) averaged as weight deltas.

    Args:
        adapters: The adapters to average; all must adapt the same modules with the same shapes.
        max_rank: Cap on the soup's rank; None keeps the exact rank ``min(sum of ranks, out, in)``.

    Returns:
        The soup's LoRA state dict (same key names) and its adapter config (``r`` = ``lora_alpha`` = the
        soup rank, so its scaling is 1).

    Raises:
        ValueError: no adapters, or adapters that adapt different modules or shapes.
    """
    if not adapters:
        raise ValueError("model_soup: no adapters to average")
    return weighted_delta_adapter(adapters, [1.0 / len(adapters)] * len(adapters), max_rank)
