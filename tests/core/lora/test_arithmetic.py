"""Tests of icm_core.lora.arithmetic: weight deltas, their factorisation and weighted sums of adapters."""

from __future__ import annotations

import pytest
import torch

from icm_core.lora.arithmetic import factorise, lora_scaling, merged_delta, weighted_delta_adapter
from tests import helpers


def test_factorise_is_exact_at_full_rank():
    delta = torch.randn(7, 5, dtype=torch.float64)
    b, a = factorise(delta, 5)
    assert b.shape == (7, 5) and a.shape == (5, 5)
    assert torch.allclose(b @ a, delta, atol=1e-10)


def test_scaling_follows_peft():
    assert lora_scaling({"r": 4, "lora_alpha": 8}) == 2.0
    assert lora_scaling({"r": 4, "lora_alpha": 8, "use_rslora": True}) == 4.0
    with pytest.raises(ValueError, match="rank_pattern"):
        lora_scaling({"r": 4, "lora_alpha": 8, "rank_pattern": {"q_proj": 2}})


def _adapters(n: int):
    cfg = helpers.lora_config(rank=2)
    out = []
    for seed in range(n):
        state = helpers.random_lora_state(helpers.tiny_model(), cfg, seed=seed)
        config = {"r": 2, "lora_alpha": 8.0, "target_modules": ["q_proj", "v_proj"]}
        out.append((state, config))
    return out


def test_mean_lora_is_the_exact_mean_of_weight_deltas():
    adapters = _adapters(3)
    state, config = weighted_delta_adapter(adapters, [1 / 3] * 3)
    mean = merged_delta(state, config)
    deltas = [merged_delta(s, c) for s, c in adapters]
    for module, value in mean.items():
        expected = sum(d[module] for d in deltas) / 3
        assert torch.allclose(value, expected, atol=1e-6), module
    assert config["r"] == 6


def test_weighted_adapter_applies_the_weights():
    adapters = _adapters(2)
    state, config = weighted_delta_adapter(adapters, [0.8, 0.2])
    got = merged_delta(state, config)
    for module, value in got.items():
        expected = 0.8 * merged_delta(*adapters[0])[module] + 0.2 * merged_delta(*adapters[1])[module]
        assert torch.allclose(value, expected, atol=1e-6)
