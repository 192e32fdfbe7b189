"""Tests of icm_core.lora.flatten: LoRA state dict <-> flat vector, layouts, and normalisation statistics."""

from __future__ import annotations

import json

import pytest
import torch

from icm_core.lora.flatten import (
    LoraLayout,
    check_layout,
    denormalize,
    fit_norm_stats,
    flatten_lora,
    lora_layout,
    natural_key,
    normalize,
    unflatten_lora,
)
from tests import helpers


@pytest.fixture(scope="module")
def peft_state() -> dict[str, torch.Tensor]:
    """A real peft LoRA state dict of the tiny model (2 layers, q/v, rank 2), randomised."""
    return helpers.random_lora_state(helpers.tiny_model(), seed=1)


@pytest.fixture(scope="module")
def deep_peft_state() -> dict[str, torch.Tensor]:
    """A real peft LoRA state dict of a 12-layer tiny model: layer indices 2 and 10 both occur."""
    return helpers.random_lora_state(helpers.tiny_model(num_layers=12), seed=2)


def _layer(key: str) -> int:
    parts = key.split(".")
    return int(parts[parts.index("layers") + 1])


def test_round_trip_is_exact(peft_state):
    flat, layout = flatten_lora(peft_state)
    assert flat.dim() == 1 and flat.dtype == torch.float32
    assert flat.numel() == layout.total == sum(t.numel() for t in peft_state.values())
    back = unflatten_lora(flat, layout)
    assert set(back) == set(peft_state)
    for key, tensor in peft_state.items():
        assert back[key].shape == tensor.shape
        assert torch.equal(back[key], tensor), key
        assert back[key].is_contiguous()


def test_unflatten_returns_copies(peft_state):
    flat, layout = flatten_lora(peft_state)
    back = unflatten_lora(flat, layout)
    flat.zero_()
    assert torch.equal(back[layout.keys[0]], peft_state[layout.keys[0]])


def test_round_trip_with_a_given_layout_ignores_insertion_order(peft_state):
    layout = lora_layout(peft_state)
    shuffled = {key: peft_state[key] for key in reversed(list(peft_state))}
    flat_a, _ = flatten_lora(peft_state, layout)
    flat_b, _ = flatten_lora(shuffled, layout)
    assert torch.equal(flat_a, flat_b)


def test_peft_keys_look_like_peft_keys(peft_state):
    assert all(".lora_A." in k or ".lora_B." in k for k in peft_state)
    assert all(".default." not in k for k in peft_state)  # saved names carry no adapter name


def test_natural_key_order_on_real_peft_keys(deep_peft_state):
    layout = lora_layout(deep_peft_state)
    layers = [_layer(key) for key in layout.keys]
    assert layers == sorted(layers)
    assert set(layers) == set(range(12))
    first_2 = layers.index(2)
    first_10 = layers.index(10)
    assert first_2 < first_10
    # Plain string sorting would put layers.10 before layers.2: the layout must not.
    string_layers = [_layer(k) for k in sorted(deep_peft_state)]
    assert string_layers != sorted(string_layers)


def test_natural_key():
    names = ["layers.10.x", "layers.2.x", "layers.1.x", "epoch_10", "epoch_2"]
    assert sorted(names, key=natural_key) == ["epoch_2", "epoch_10", "layers.1.x", "layers.2.x", "layers.10.x"]


def test_offsets_are_contiguous(deep_peft_state):
    layout = lora_layout(deep_peft_state)
    offset = 0
    for spec in layout.specs:
        assert spec.offset == offset
        assert spec.shape == tuple(deep_peft_state[spec.key].shape)
        offset += spec.numel
    assert offset == layout.total


def test_layout_json_round_trip(peft_state):
    layout = lora_layout(peft_state)
    text = json.dumps(layout.to_json())
    again = LoraLayout.from_json(json.loads(text))
    assert again == layout
    assert again.total == layout.total and again.keys == layout.keys
    flat, _ = flatten_lora(peft_state, layout)
    back = unflatten_lora(flat, again)
    assert all(torch.equal(back[k], peft_state[k]) for k in peft_state)


def test_check_layout_names_key_with_other_rank(peft_state):
    layout = lora_layout(peft_state)
    key = next(k for k in layout.keys if ".lora_A." in k)
    bad = dict(peft_state)
    bad[key] = torch.zeros(peft_state[key].shape[0] + 2, peft_state[key].shape[1])
    with pytest.raises(ValueError, match="rank") as info:
        check_layout(bad, layout, where="ckpt-7")
    assert key in str(info.value)
    assert "ckpt-7" in str(info.value)
    with pytest.raises(ValueError, match="rank"):
        flatten_lora(bad, layout)


def test_check_layout_names_missing_and_extra_keys(peft_state):
    layout = lora_layout(peft_state)
    missing_key = layout.keys[-1]
    bad = {k: v for k, v in peft_state.items() if k != missing_key}
    with pytest.raises(ValueError, match="missing") as info:
        check_layout(bad, layout)
    assert missing_key in str(info.value)

    extra = dict(peft_state)
    extra["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"] = torch.zeros(2, 32)
    with pytest.raises(ValueError, match="unexpected") as info:
        check_layout(extra, layout)
    assert "k_proj" in str(info.value)


def test_empty_state_and_wrong_vector_length(peft_state):
    with pytest.raises(ValueError, match="empty"):
        lora_layout({})
    flat, layout = flatten_lora(peft_state)
    with pytest.raises(ValueError, match=str(layout.total)):
        unflatten_lora(flat[:-1], layout)
    with pytest.raises(ValueError):
        unflatten_lora(flat.unsqueeze(0), layout)


def test_norm_stats_round_trip(peft_state):
    layout = lora_layout(peft_state)
    generator = torch.Generator().manual_seed(0)
    # Rows with a different scale and offset per tensor, like real checkpoints.
    base, _ = flatten_lora(peft_state, layout)
    scale = torch.cat([torch.full((s.numel,), 10.0 ** (i % 4 - 2)) for i, s in enumerate(layout.specs)])
    shift = torch.cat([torch.full((s.numel,), float(i)) for i, s in enumerate(layout.specs)])
    rows = (base + torch.randn(6, layout.total, generator=generator)) * scale + shift
    stats = fit_norm_stats(rows, layout)
    assert stats.mean.shape == stats.std.shape == (len(layout.specs),)
    normed = normalize(rows, stats, layout)
    for spec in layout.specs:
        block = normed[:, spec.offset : spec.offset + spec.numel].double()
        assert abs(block.mean().item()) < 1e-4
        assert block.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
    assert torch.allclose(denormalize(normed, stats, layout), rows, rtol=1e-5, atol=1e-5)


def test_coordinate_normalisation_removes_the_shared_part(peft_state):
    """normalization='coordinate': the per-coordinate mean over all rows is subtracted first (it is stored as
    ``center``), then each tensor is z-scored; what is left is what tells rows apart, and it inverts exactly."""
    layout = lora_layout(peft_state)
    generator = torch.Generator().manual_seed(1)
    shared, _ = flatten_lora(peft_state, layout)  # one large shared vector (like LoRA A's common initialisation)
    rows = 100.0 * shared + torch.randn(8, layout.total, generator=generator)
    stats = fit_norm_stats(rows, layout, center=True)
    assert stats.center is not None and stats.center.shape == (layout.total,)
    assert torch.allclose(stats.center, rows.double().mean(0).float(), atol=1e-4)
    normed = normalize(rows, stats, layout)
    # Every coordinate has mean zero over the rows: the shared vector is gone ...
    assert float(normed.double().mean(0).abs().max()) < 1e-4
    for spec in layout.specs:  # ... and every tensor has unit spread
        block = normed[:, spec.offset : spec.offset + spec.numel].double()
        assert block.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-3)
    assert torch.allclose(denormalize(normed, stats, layout), rows, rtol=1e-5, atol=1e-3)
    # Without centring the shared vector dominates: rows are nearly identical after the z-score.
    plain = normalize(rows, fit_norm_stats(rows, layout), layout)
    spread_plain = float((plain - plain.mean(0)).norm() / plain.norm())
    spread_centred = float((normed - normed.mean(0)).norm() / normed.norm())
    assert spread_plain < 0.05 < 0.9 < spread_centred


def test_norm_stats_constant_tensor_stays_finite(peft_state):
    layout = lora_layout(peft_state)
    rows = torch.zeros(3, layout.total)
    stats = fit_norm_stats(rows, layout)
    assert bool((stats.std > 0).all())
    normed = normalize(rows, stats, layout)
    assert bool(torch.isfinite(normed).all())
    assert torch.equal(denormalize(normed, stats, layout), rows)
