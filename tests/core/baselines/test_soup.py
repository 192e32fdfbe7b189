"""Model Soup: the uniform average of adapters taken over their weight deltas dW = scaling * B @ A."""

from __future__ import annotations

import pytest
import torch

from icm_core.baselines.soup import model_soup
from icm_core.lora.adapters import adapter_config_dict, load_adapter, merge_adapter, write_adapter
from icm_core.lora.arithmetic import lora_modules, merged_delta
from tests import helpers


def adapter(seed: int, rank: int = 2, alpha: float = 8.0, modules: int = 2) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for layer in range(modules):
        prefix = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        state[f"{prefix}.lora_A.weight"] = torch.randn(rank, 16, generator=g)
        state[f"{prefix}.lora_B.weight"] = torch.randn(12, rank, generator=g)
    return state, {"r": rank, "lora_alpha": alpha, "target_modules": ["q_proj"]}


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_soup_of_identical_adapters_equals_the_adapter():
    one = adapter(0)
    state, config = model_soup([one, one, one])
    assert max_diff(merged_delta(state, config), merged_delta(*one)) < 1e-5
    assert set(state) == set(one[0])


def test_soup_averages_weight_deltas_exactly():
    adapters = [adapter(seed, rank=rank) for seed, rank in [(1, 2), (2, 2), (3, 1)]]
    state, config = model_soup(adapters)
    assert config["r"] == config["lora_alpha"] == 5  # sum of ranks: exact
    expected = {k: sum(merged_delta(s, c)[k] for s, c in adapters) / 3 for k in merged_delta(state, config)}
    assert max_diff(merged_delta(state, config), expected) < 1e-5


def test_averaging_a_and_b_separately_is_not_the_soup():
    # peft #643: mean(B) @ mean(A) differs from mean(B @ A); the soup must not do that.
    (s1, c), (s2, _) = adapter(1), adapter(2)
    naive = {k: (s1[k] + s2[k]) / 2 for k in s1}
    soup_state, soup_cfg = model_soup([(s1, c), (s2, c)])
    assert max_diff(merged_delta(naive, c), merged_delta(soup_state, soup_cfg)) > 1e-2


def test_max_rank_gives_the_best_low_rank_approximation():
    adapters = [adapter(seed) for seed in range(4)]
    state, config = model_soup(adapters, max_rank=3)
    assert config["r"] == 3
    exact = {k: sum(merged_delta(s, c)[k] for s, c in adapters) / 4 for k in merged_delta(state, config)}
    for key, delta in merged_delta(state, config).items():
        singular = torch.linalg.svdvals(exact[key])
        # Eckart-Young: the Frobenius error of the best rank-3 approximation is the norm of the tail.
        assert float((delta - exact[key]).norm()) == pytest.approx(float(singular[3:].norm()), rel=1e-4)


def test_mismatched_adapters_are_refused():
    with pytest.raises(ValueError, match="other modules"):
        model_soup([adapter(0, modules=2), adapter(1, modules=1)])
    with pytest.raises(ValueError, match="no adapters"):
        model_soup([])
    with pytest.raises(ValueError, match="unpaired"):
        lora_modules({"x.lora_A.weight": torch.zeros(1, 1)})


def test_soup_adapter_loads_and_merges_into_the_model(tmp_path, tiny_model_cfg, fresh_base):
    """Merging the written soup adapter adds exactly the mean delta to each adapted weight."""
    from peft import get_peft_model

    from icm_core.lora.adapters import lora_config_for

    cfg = helpers.lora_config(rank=2)
    adapters = []
    for seed in range(3):
        state = helpers.random_lora_state(fresh_base(), cfg, seed=seed)
        peft_model = get_peft_model(fresh_base(), lora_config_for(fresh_base(), cfg, tiny_model_cfg.name_or_path))
        adapters.append((state, adapter_config_dict(peft_model, tiny_model_cfg.name_or_path)))
    soup_state, soup_config = model_soup(adapters)
    folder = write_adapter(tmp_path / "soup", soup_state, soup_config)
    assert load_adapter(fresh_base(), folder, tiny_model_cfg.name_or_path) is not None

    base = fresh_base()
    before = {name: p.detach().clone() for name, p in base.named_parameters()}
    merged = merge_adapter(base, folder, tiny_model_cfg.name_or_path)
    after = dict(merged.named_parameters())
    mean_delta = {
        k: sum(merged_delta(s, c)[k] for s, c in adapters) / len(adapters) for k in merged_delta(*adapters[0])
    }
    checked = 0
    for module, delta in mean_delta.items():
        name = module.removeprefix("base_model.model.") + ".weight"
        assert torch.allclose(after[name] - before[name], delta.float(), atol=1e-5), name
        checked += 1
    assert checked == len(lora_modules(adapters[0][0])) > 0
