"""Model Soup for LoRA."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from icm_core.lora.arithmetic import _pair, delta_weights, factorise, lora_modules, lora_scaling


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
    first_state, first_config = adapters[0]
    modules = lora_modules(first_state)
    total: dict[str, torch.Tensor] = {}
    for i, (state, config) in enumerate(adapters):
        if lora_modules(state) != modules:
            raise ValueError(f"model_soup: adapter {i} adapts other modules than adapter 0")
        for module, delta in delta_weights(state, lora_scaling(config)).items():
            if module in total and total[module].shape != delta.shape:
                raise ValueError(f"model_soup: adapter {i} module {module} has delta shape {tuple(delta.shape)}")
            total[module] = total[module] + delta if module in total else delta
    full_rank = sum(int(config["r"]) for _, config in adapters)
    soup_rank = full_rank if max_rank is None else min(full_rank, max_rank)
    soup_rank = min(soup_rank, *(min(d.shape) for d in total.values()))
    state: dict[str, torch.Tensor] = {}
    for module in modules:
        b, a = factorise(total[module] / len(adapters), soup_rank)
        a_key, b_key = _pair(first_state, module)
        state[a_key], state[b_key] = a.float().contiguous(), b.float().contiguous()
    config = copy.deepcopy(dict(first_config))
    config.update(
        {"r": soup_rank, "lora_alpha": soup_rank, "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {}}
    )
    return state, config
