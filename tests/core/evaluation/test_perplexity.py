"""Tests of icm_core.evaluation.perplexity: PPL / BPC against a hand computation on the tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from icm_core.evaluation.config import EvalConfig
from icm_core.evaluation.perplexity import (
    LMScore,
    eval_blocks,
    evaluate_lm,
    gain_recovered,
    score_blocks,
    spread_indices,
)
from tests import helpers


TEXTS = [helpers.SAMPLE_TEXT, "   ", helpers.OTHER_TEXT, "caf\u00e9 na\u00efve \u2014 r\u00e9sum\u00e9"]
SEQ_LEN = 16


@pytest.fixture(scope="module")
def model(tiny_model_cfg):
    from icm_core.models.base_model import load_base_model

    return load_base_model(tiny_model_cfg)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_cfg):
    from icm_core.models.base_model import load_tokenizer

    return load_tokenizer(tiny_model_cfg)


def _hand_score(model, tokenizer, texts, seq_len, max_tokens):
    """PPL / BPC computed independently: logits -> log-softmax -> NLL of targets 1..T-1 per block."""
    text = "\n\n".join(t for t in texts if t.strip())
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    available = len(ids) // seq_len
    wanted = max(1, max_tokens // seq_len)
    # Evenly spaced blocks over the whole split when the budget is smaller than it.
    chosen = range(available) if wanted >= available else [i * available // wanted for i in range(wanted)]
    nll, tokens, per_block = 0.0, 0, []
    with torch.no_grad():
        for b in chosen:
            block = torch.tensor(ids[b * seq_len : (b + 1) * seq_len]).unsqueeze(0)
            logp = torch.log_softmax(model(input_ids=block).logits[0].double(), dim=-1)
            block_nll = 0.0
            for t in range(1, seq_len):
                block_nll -= logp[t - 1, block[0, t]].item()
                tokens += 1
            per_block.append(block_nll)
            nll += block_nll
    # Char tokenizer: every predicted token covers exactly one character.
    chars = tokens
    return nll, tokens, chars, math.exp(nll / tokens), nll / math.log(2) / chars, text, per_block


def test_tokenizer_is_character_level(tokenizer, char_tokenizer):
    text = "ab c\n\u00e9!"
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    assert enc["input_ids"] == char_tokenizer(text, add_special_tokens=False)["input_ids"]  # saved == built
    assert len(enc["input_ids"]) == len(text)
    assert enc["offset_mapping"] == [(i, i + 1) for i in range(len(text))]
    assert enc["input_ids"][5] == tokenizer.unk_token_id
    assert tokenizer.eos_token == helpers.EOS and tokenizer.pad_token == helpers.PAD


def test_loaded_base_equals_built_model(model, tokenizer):
    built = helpers.tiny_model()
    ids = torch.tensor([tokenizer("hello world", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, built(input_ids=ids).logits)
    assert not model.training
    assert model.config.vocab_size == len(tokenizer)


@pytest.mark.parametrize("max_tokens, batch_size", [(4096, 8), (4096, 3), (48, 2)])
def test_matches_hand_computation(model, tokenizer, max_tokens, batch_size):
    nll, tokens, chars, ppl, bpc, text, per_block = _hand_score(model, tokenizer, TEXTS, SEQ_LEN, max_tokens)
    score = evaluate_lm(model, tokenizer, TEXTS, SEQ_LEN, EvalConfig(max_tokens=max_tokens, batch_size=batch_size))
    assert isinstance(score, LMScore)
    n_blocks = min(len(text) // SEQ_LEN, max(1, max_tokens // SEQ_LEN))
    assert score.tokens == tokens == n_blocks * (SEQ_LEN - 1)
    assert score.chars == chars
    assert score.nll_nats == pytest.approx(nll, rel=1e-5)
    assert score.ppl == pytest.approx(ppl, rel=1e-5)
    assert score.bpc == pytest.approx(bpc, rel=1e-5)
    # Characters == tokens, so BPC * ln 2 is the mean NLL per token, i.e. ln PPL.
    assert score.bpc * math.log(2) == pytest.approx(score.nll_nats / score.tokens, rel=1e-12)
    assert score.bpc * math.log(2) == pytest.approx(math.log(score.ppl), rel=1e-12)
    # Per block: what the report's bootstrap resamples; the sums are the totals.
    assert score.block_nll == pytest.approx(per_block, rel=1e-5)
    assert score.block_tokens == [SEQ_LEN - 1] * n_blocks and sum(score.block_chars) == chars
    assert score.blocks_available == len(text) // SEQ_LEN
    assert set(score.as_dict()) == {
        "nll_nats",
        "tokens",
        "chars",
        "ppl",
        "bpc",
        "block_nll",
        "block_tokens",
        "block_chars",
        "blocks_available",
    }


def test_spread_indices_cover_the_split():
    assert spread_indices(10, 20) == list(range(10))
    assert spread_indices(10, 5) == [0, 2, 4, 6, 8]
    assert spread_indices(119, 32)[-1] >= 110  # the last documents are scored too, not only the first
    assert len(set(spread_indices(119, 32))) == 32


def test_model_mode_is_restored(model, tokenizer):
    model.train()
    try:
        evaluate_lm(model, tokenizer, TEXTS, SEQ_LEN, EvalConfig(max_tokens=32))
        assert model.training
    finally:
        model.eval()


def test_eval_blocks_shapes_and_max_tokens(tokenizer):
    blocks = eval_blocks(TEXTS, tokenizer, SEQ_LEN, max_tokens=4096)
    text = "\n\n".join(t for t in TEXTS if t.strip())
    assert blocks.input_ids.shape == (len(text) // SEQ_LEN, SEQ_LEN)
    assert blocks.target_chars.shape == (len(text) // SEQ_LEN, SEQ_LEN - 1)
    assert bool((blocks.target_chars == 1).all())
    # The joined text (blank lines between non-empty documents) is what gets scored.
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert blocks.input_ids[0].tolist() == ids[:SEQ_LEN]
    two = eval_blocks(TEXTS, tokenizer, SEQ_LEN, max_tokens=40)
    assert two.input_ids.shape[0] == 2 and two.available == len(text) // SEQ_LEN
    # Two blocks out of the whole split: the first one and the one half-way through, not blocks 0 and 1.
    half = (len(text) // SEQ_LEN) // 2
    assert two.input_ids[1].tolist() == ids[half * SEQ_LEN : (half + 1) * SEQ_LEN]
    assert eval_blocks(TEXTS, tokenizer, SEQ_LEN, max_tokens=1).input_ids.shape[0] == 1
    with pytest.raises(ValueError, match="fewer than one block"):
        eval_blocks(["short"], tokenizer, SEQ_LEN, max_tokens=4096)


def test_multi_character_tokens_count_gaps():
    """With word tokens, each target covers the gap before it plus its own characters."""
    words = ["alpha", "beta", "gamma", "delta"]
    tokenizer = helpers.word_tokenizer(words)
    text = "alpha  beta gamma\tdelta alpha beta"
    blocks = eval_blocks([text], tokenizer, seq_len=3, max_tokens=100)
    assert blocks.input_ids.shape == (2, 3)
    # ends: alpha 5, beta 11, gamma 17, delta 23, alpha 29, beta 34
    assert blocks.target_chars.tolist() == [[6, 6], [6, 5]]
    assert int(blocks.target_chars.sum()) == (11 - 5) + (17 - 11) + (29 - 23) + (34 - 29)


def test_score_blocks_bpc_uses_characters(model, tokenizer):
    blocks = eval_blocks(TEXTS, tokenizer, SEQ_LEN, max_tokens=64)
    doubled = type(blocks)(blocks.input_ids, blocks.target_chars * 2)
    a, b = score_blocks(model, blocks), score_blocks(model, doubled)
    assert a.nll_nats == b.nll_nats and a.ppl == b.ppl
    assert b.chars == 2 * a.chars
    assert b.bpc == pytest.approx(a.bpc / 2, rel=1e-12)


def test_gain_recovered():
    assert gain_recovered(10.0, 5.0, 7.5) == pytest.approx(0.5)
    assert gain_recovered(10.0, 5.0, 5.0) == pytest.approx(1.0)
    assert gain_recovered(10.0, 5.0, 10.0) == pytest.approx(0.0)
    assert gain_recovered(10.0, 5.0, 4.0) == pytest.approx(1.2)  # better than the LoRA it imitates
    assert gain_recovered(10.0, 5.0, 12.0) == pytest.approx(-0.4)  # worse than the base model
    assert gain_recovered(10.0, 12.0, 11.0) == pytest.approx(0.5)  # fine-tuning hurt; half of that too
    assert gain_recovered(10.0, 10.0, 9.0) is None


# ------------------------------------------------------------------ shared prefix (layers below an adapter)


def test_scoring_from_an_adapted_layer_equals_the_whole_forward(model, tokenizer):
    """With a change confined to decoder layer 1 (as a merged adapter of the last layers), scoring only layers
    1.. on the cached states entering layer 1 gives the whole forward's NLL; the prefix runs once per block set."""
    from icm_core.models.prefix import decoder_stack, layers_from

    blocks = eval_blocks(TEXTS, tokenizer, SEQ_LEN, 96)
    layer1 = decoder_stack(model).layers[1].self_attn.q_proj.weight
    saved = layer1.detach().clone()
    layer0_calls = []
    handle = decoder_stack(model).layers[0].register_forward_pre_hook(lambda *a: layer0_calls.append(1))
    try:
        with torch.no_grad():
            layer1.add_(0.05 * torch.randn_like(layer1))
        whole = score_blocks(model, blocks, batch_size=2)
        calls_whole = len(layer0_calls)
        suffix = score_blocks(model, blocks, batch_size=2, start_layer=1)
        calls_first = len(layer0_calls) - calls_whole
        again = score_blocks(model, blocks, batch_size=2, start_layer=1)
    finally:
        handle.remove()
        with torch.no_grad():
            layer1.copy_(saved)
    assert suffix.block_nll == pytest.approx(whole.block_nll, rel=1e-6, abs=1e-6)
    assert again.block_nll == suffix.block_nll
    assert calls_first == calls_whole  # the prefix pass: layer 0 once per batch ...
    assert len(layer0_calls) == 2 * calls_whole  # ... and not again for the second adapter
    # The layer list is whole again after the suffix passes.
    assert len(decoder_stack(model).layers) == 2
    with layers_from(model, 1):
        assert len(decoder_stack(model).layers) == 1
    assert len(decoder_stack(model).layers) == 2


def test_first_adapted_layer_reads_peft_keys():
    from icm_core.lora.adapters import first_adapted_layer

    keys = [
        "base_model.model.model.layers.22.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.29.self_attn.v_proj.lora_B.weight",
    ]
    assert first_adapted_layer(keys) == 22
    assert first_adapted_layer([*keys, "base_model.model.lm_head.lora_A.weight"]) == 0
    assert first_adapted_layer([]) == 0
