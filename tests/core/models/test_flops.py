"""The model-FLOPs formula (icm_core.models.flops) against torch's own FLOP counter on a small Llama."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from icm_core.models.flops import causal_lm_flops_per_token, layer_matmul_params, matmul_shapes
from tests import helpers


def counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.fixture
def blocks():
    return torch.randint(2, 40, (2, 16), generator=torch.Generator().manual_seed(0))


def test_forward_matches_the_flop_counter(blocks):
    model = helpers.tiny_model(num_layers=3)
    cfg = model.config
    with torch.no_grad():
        got = counted(lambda: model(input_ids=blocks))
    # torch's counter does not see the fused CPU attention kernel: compare without the attention products.
    assert got == pytest.approx(causal_lm_flops_per_token(cfg, 16, attention=False) * blocks.numel(), rel=1e-9)
    attention = 4 * 16 * cfg.hidden_size * cfg.num_hidden_layers
    assert causal_lm_flops_per_token(cfg, 16) - causal_lm_flops_per_token(cfg, 16, attention=False) == attention
    assert layer_matmul_params(cfg) == 32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 64


def test_lora_training_matches_the_flop_counter(blocks):
    from peft import get_peft_model

    from icm_core.lora.adapters import lora_config_for

    base = helpers.tiny_model(num_layers=4)
    model = get_peft_model(base, lora_config_for(base, helpers.lora_config(last_n_layers=2), "tiny"))
    model.train()
    got = counted(lambda: model(input_ids=blocks, labels=blocks).loss.backward())
    per_token = causal_lm_flops_per_token(
        model.config, 16, train_from=2, lora_rank=2, lora_targets=("q_proj", "v_proj"), attention=False
    )
    assert got == pytest.approx(per_token * blocks.numel(), rel=1e-9)


def test_prefix_and_no_head_count_less(blocks):
    cfg = helpers.tiny_llama_config(num_layers=4)
    full = causal_lm_flops_per_token(cfg, 16)
    assert causal_lm_flops_per_token(cfg, 16, first_layer=2) < full
    assert causal_lm_flops_per_token(cfg, 16, head=False) == full - 2 * cfg.hidden_size * cfg.vocab_size
    shapes = matmul_shapes(cfg, 32, train_from=2)
    assert (32, cfg.hidden_size, cfg.vocab_size, 1) in shapes
