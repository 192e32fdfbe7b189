"""Arithmetic on LoRA adapters, over their weight deltas: ``dW = scaling * B @ A`` per adapted module.

Combining the A and B matrices separately is not combining the adapters: mean(B) @ mean(A) is not
mean(B @ A) (peft issue #643). :func:`weighted_delta_adapter` sums the deltas of every adapted module,

    dW = sum_i w_i * dW_i,        dW_i = scaling_i * B_i @ A_i,

and re-factorises each sum by SVD into a standard LoRA pair. A sum of n rank-r deltas has rank <= n*r, so an
adapter of rank ``min(sum of ranks, out, in)`` is exact (up to float rounding); a smaller ``max_rank`` truncates it
to the best approximation of that rank. It is written with ``lora_alpha = r`` (scaling 1), so any PEFT loader
reproduces dW exactly. The mean LoRA, softmax k-NN and Model Soup baselines are all such sums.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from icm_core.lora.flatten import natural_key


LORA_A, LORA_B = ".lora_A.", ".lora_B."


def lora_modules(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Adapted module prefixes (the part of each key before ``.lora_A.``), in natural order.

    Raises:
        ValueError: a lora_A key has no lora_B partner (or the reverse), or a key is neither.
    """
    a_mods = {key.split(LORA_A)[0] for key in state_dict if LORA_A in key}
    b_mods = {key.split(LORA_B)[0] for key in state_dict if LORA_B in key}
    others = [key for key in state_dict if LORA_A not in key and LORA_B not in key]
    if others:
        raise ValueError(f"not a LoRA A/B state dict: unexpected keys {sorted(others)[:3]}")
    if a_mods != b_mods:
        raise ValueError(f"unpaired LoRA matrices for modules {sorted(a_mods ^ b_mods)[:3]}")
    return sorted(a_mods, key=natural_key)


def _pair(state_dict: Mapping[str, torch.Tensor], module: str) -> tuple[str, str]:
    a_key = next(k for k in state_dict if k.startswith(module + LORA_A))
    return a_key, a_key.replace(LORA_A, LORA_B, 1)


def lora_scaling(adapter_config: Mapping[str, Any]) -> float:
    """peft's scaling of B @ A: alpha / r, or alpha / sqrt(r) with rsLoRA.

    Raises:
        ValueError: the config uses per-module rank or alpha patterns (one scaling would be wrong).
    """
    if adapter_config.get("rank_pattern") or adapter_config.get("alpha_pattern"):
        raise ValueError("adapter_config: rank_pattern / alpha_pattern are not supported by Model Soup")
    rank, alpha = int(adapter_config["r"]), float(adapter_config["lora_alpha"])
    return alpha / math.sqrt(rank) if adapter_config.get("use_rslora") else alpha / rank


def scaled_factors(
    state_dict: Mapping[str, torch.Tensor], scaling: float
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module: (scaling * B, A)}`` for every adapted module (float64), so that dW = B' @ A."""
    factors = {}
    for module in lora_modules(state_dict):
        a_key, b_key = _pair(state_dict, module)
        factors[module] = (scaling * state_dict[b_key].double(), state_dict[a_key].double())
    return factors


def delta_weights(state_dict: Mapping[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """dW = scaling * B @ A for every adapted module (float64, for an exact average)."""
    return {module: b @ a for module, (b, a) in scaled_factors(state_dict, scaling).items()}


def factorise(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors (B [out, r], A [r, in]) of ``delta`` with B @ A ~= delta (SVD)."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root.unsqueeze(1) * vh[:rank]


def merged_delta(state_dict: Mapping[str, torch.Tensor], adapter_config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The weight change an adapter applies to each module (what merging adds to the base weights)."""
    return delta_weights(state_dict, lora_scaling(adapter_config))


def weighted_delta_adapter(
    adapters: Sequence[tuple[Mapping[str, torch.Tensor], Mapping[str, Any]]],
    weights: Sequence[float],
    max_rank: int | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """One LoRA adapter whose weight change is ``sum_i w_i * dW_i``: exact at the default rank (the sum of the
    adapters' ranks, capped by each module's shape), the best approximation of rank ``max_rank`` when given.

    With uniform weights this is the mean LoRA (the average of the adapters' weight deltas, Model Soup).

    Returns:
        The LoRA state dict (the first adapter's key names) and its adapter config (``r`` = ``lora_alpha`` = the
        rank, so its scaling is 1).

    Raises:
        ValueError: No adapters, a weight count mismatch, or adapters of different modules / shapes.
    """
    if not adapters or len(adapters) != len(weights):
        raise ValueError(f"weighted adapter: {len(adapters)} adapters, {len(weights)} weights")
    first_state, first_config = adapters[0]
    modules = lora_modules(first_state)
    total: dict[str, torch.Tensor] = {}
    for i, ((state, config), weight) in enumerate(zip(adapters, weights, strict=True)):
        if lora_modules(state) != modules:
            raise ValueError(f"weighted adapter: adapter {i} adapts other modules than adapter 0")
        for module, delta in delta_weights(state, lora_scaling(config)).items():
            if module in total and total[module].shape != delta.shape:
                raise ValueError(f"weighted adapter: adapter {i} module {module} has shape {tuple(delta.shape)}")
            total[module] = total.get(module, 0) + float(weight) * delta
    rank = sum(int(config["r"]) for _, config in adapters)
    rank = min(rank if max_rank is None else min(rank, max_rank), *(min(d.shape) for d in total.values()))
    state: dict[str, torch.Tensor] = {}
    for module in modules:
        b, a = factorise(total[module], rank)
        a_key, b_key = _pair(first_state, module)
        state[a_key], state[b_key] = a.float().contiguous(), b.float().contiguous()
    config = copy.deepcopy(dict(first_config))
    config.update({"r": rank, "lora_alpha": rank, "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {}})
    return state, config
