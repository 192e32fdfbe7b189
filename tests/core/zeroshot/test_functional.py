"""Tests of icm_core.zeroshot.functional: the LM loss through the frozen base model reaches the generator."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from icm_core.generator.config import CVAEConfig
from icm_core.generator.dataset import build_dataset
from icm_core.generator.train import train_generator
from icm_core.lora.arithmetic import lora_modules, merged_delta
from icm_core.zeroshot.functional import (
    DECODER_PREFIXES,
    FunctionalConfig,
    _decode_lora,
    base_weight_name,
    functional_finetune,
    functional_lm_loss,
)
from tests import helpers


CONFIG = {"r": 2, "lora_alpha": 8.0, "target_modules": ["q_proj", "v_proj"]}
CVAE = CVAEConfig(channels=(4, 8), latent_dim=8, epochs=2, batch_size=2, seed=1)


def _state(seed: int) -> dict[str, torch.Tensor]:
    return {
        k: 0.05 * v
        for k, v in helpers.random_lora_state(helpers.tiny_model(), helpers.lora_config(rank=2), seed).items()
    }


@pytest.fixture(scope="module")
def setup():
    states = {"a": [_state(0), _state(1)], "b": [_state(2), _state(3)]}
    vectors = {"a": torch.tensor([1.0, 0.0, 0.5]), "b": torch.tensor([0.0, 1.0, -0.5])}
    dataset = build_dataset(states, vectors)
    generator, _, _ = train_generator(dataset, CVAE, CONFIG)
    blocks = helpers.char_blocks(helpers.SAMPLE_TEXT + helpers.OTHER_TEXT, 16)
    return generator, dataset, {"a": blocks[:4], "b": blocks[4:8]}


def test_functional_loss_equals_the_loss_of_the_merged_model():
    model = helpers.tiny_model(seed=1)
    state = _state(5)
    ids = helpers.char_blocks(helpers.SAMPLE_TEXT, 16)[:3]
    got = functional_lm_loss(model, state, CONFIG, ids)
    merged = copy.deepcopy(model)
    params = dict(merged.named_parameters())
    with torch.no_grad():
        for module, delta in merged_delta(state, CONFIG).items():
            params[base_weight_name(module)] += delta.float()
        logits = merged(input_ids=ids).logits[:, :-1]
        expected = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:])
    assert torch.allclose(got, expected, atol=1e-5)
    assert len(lora_modules(state)) > 0
    # the base model itself is untouched
    name = base_weight_name(lora_modules(state)[0])
    assert torch.equal(dict(model.named_parameters())[name], dict(helpers.tiny_model(seed=1).named_parameters())[name])


def test_functional_loss_gradient_reaches_the_generator_decoder_only(setup):
    generator, dataset, blocks = setup
    base = helpers.tiny_model(seed=1)
    for p in base.parameters():
        p.requires_grad_(False)
    generator.model.zero_grad(set_to_none=True)
    cond = generator.cond_norm(dataset.task_vectors["a"]).unsqueeze(0)
    _, lora = _decode_lora(generator, torch.randn(1, generator.model.latent_dim), cond)
    functional_lm_loss(base, lora, generator.adapter_config, blocks["a"]).backward()
    decoder = {n: p.grad for n, p in generator.model.named_parameters() if n.startswith(DECODER_PREFIXES)}
    assert decoder and all(g is not None and torch.isfinite(g).all() for g in decoder.values())
    assert any(float(g.abs().sum()) > 0 for g in decoder.values())
    assert all(p.grad is None for p in base.parameters())
    generator.model.zero_grad(set_to_none=True)


def test_functional_finetune_updates_the_decoder_and_nothing_else(setup):
    generator, dataset, blocks = setup
    generator = copy.deepcopy(generator)
    base = helpers.tiny_model(seed=1)
    before = {n: p.detach().clone() for n, p in generator.model.named_parameters()}
    base_before = {n: p.detach().clone() for n, p in base.named_parameters()}
    history = functional_finetune(generator, dataset, base, blocks, FunctionalConfig(steps=4, lr=1e-3))
    assert [row["step"] for row in history] == [1, 2, 3, 4]
    assert {row["category"] for row in history} == {"a", "b"}
    changed = {n for n, p in generator.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith(DECODER_PREFIXES) for n in changed)
    assert all(torch.equal(p, base_before[n]) for n, p in base.named_parameters())
    with pytest.raises(ValueError, match="no task vector"):
        functional_finetune(generator, dataset, base, {"zzz": blocks["a"]}, FunctionalConfig(steps=1))
