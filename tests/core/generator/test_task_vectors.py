"""Tests of icm_core.generator.task_vectors: paper Eq. 1 hidden-state vectors and description embeddings."""

from __future__ import annotations

import pytest
import torch

from icm_core.generator.task_vectors import (
    TextEncoder,
    check_task_vector,
    hidden_state_task_vector,
    last_token_hidden_states,
    text_task_vector,
)
from icm_core.models.identity import ModelLoadError
from tests import helpers


@pytest.fixture(scope="module")
def model():
    return helpers.tiny_model(seed=3)


@pytest.fixture(scope="module")
def blocks():
    return helpers.char_blocks(helpers.SAMPLE_TEXT + helpers.OTHER_TEXT, 20)[:7]


def test_hidden_state_vector_equals_manual_mean(model, blocks):
    with torch.no_grad():
        out = model(input_ids=blocks, output_hidden_states=True)
    manual = out.hidden_states[-1][:, -1].mean(dim=0)
    vector = hidden_state_task_vector(model, blocks)
    assert vector.shape == (helpers.HIDDEN,) == (model.config.hidden_size,)
    assert vector.dtype == torch.float32
    assert torch.allclose(vector, manual, atol=1e-6)
    # Batching does not change the result (7 blocks in batches of 3: 3 + 3 + 1).
    assert torch.allclose(hidden_state_task_vector(model, blocks, batch_size=3), manual, atol=1e-5)


def test_last_token_hidden_states_rows(model, blocks):
    rows = last_token_hidden_states(model, blocks, batch_size=2)
    assert rows.shape == (blocks.shape[0], helpers.HIDDEN)
    with torch.no_grad():
        single = model(input_ids=blocks[4:5], output_hidden_states=True).hidden_states[-1][0, -1]
    assert torch.allclose(rows[4], single, atol=1e-5)


def test_hidden_state_vector_depends_on_data_and_restores_mode(model, blocks):
    other = helpers.char_blocks(helpers.OTHER_TEXT, 20)[:3]
    assert not torch.allclose(hidden_state_task_vector(model, blocks), hidden_state_task_vector(model, other))
    model.train()
    try:
        a = hidden_state_task_vector(model, blocks)
        assert model.training
    finally:
        model.eval()
    assert torch.allclose(a, hidden_state_task_vector(model, blocks), atol=1e-6)  # computed in eval mode


def test_hidden_state_vector_rejects_bad_blocks(model):
    with pytest.raises(ValueError, match=r"\[N, T\]"):
        hidden_state_task_vector(model, torch.zeros(0, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[N, T\]"):
        hidden_state_task_vector(model, torch.zeros(5, dtype=torch.long))


def test_check_task_vector():
    good = torch.randn(32, dtype=torch.float64)
    checked = check_task_vector(good, 32)
    assert checked.dtype == torch.float32 and torch.allclose(checked.double(), good, atol=1e-6)
    with pytest.raises(ValueError, match=r"\(31,\)") as info:
        check_task_vector(torch.zeros(31), 32, where="news.safetensors")
    assert "(32,)" in str(info.value) and "news.safetensors" in str(info.value)
    with pytest.raises(ValueError, match="expects"):
        check_task_vector(torch.zeros(1, 32), 32)
    for bad in (float("nan"), float("inf")):
        vector = torch.zeros(32)
        vector[3] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            check_task_vector(vector, 32)


HISTORY = "Encyclopedia articles about history and science."
CODE = "Python source code from the standard library."


@pytest.fixture(scope="module")
def encoder():
    return TextEncoder("minilm")


def test_minilm_text_vectors(encoder):
    assert encoder.dim == 384
    a = text_task_vector(HISTORY, encoder)
    b = text_task_vector(CODE, encoder)
    again = text_task_vector(HISTORY, encoder)
    assert a.shape == b.shape == (384,)
    assert a.dtype == torch.float32 and bool(torch.isfinite(a).all())
    assert not torch.allclose(a, b, atol=1e-3)
    assert torch.allclose(a, again, atol=1e-6)
    # Batch encoding (with padding) gives the same vectors as one text at a time.
    both = encoder.encode([HISTORY, CODE])
    assert torch.allclose(both[0], a, atol=1e-5) and torch.allclose(both[1], b, atol=1e-5)
    # Related descriptions are closer than unrelated ones.
    c = text_task_vector("Articles from an encyclopedia on science and history.", encoder)
    cos = torch.nn.functional.cosine_similarity
    assert cos(a, c, dim=0) > cos(a, b, dim=0)


def test_empty_description_is_refused(encoder):
    with pytest.raises(ValueError, match="empty"):
        text_task_vector("   ", encoder)


def test_unknown_text_encoder_path(tmp_path):
    with pytest.raises(ModelLoadError, match="text encoder"):
        TextEncoder(str(tmp_path / "no-such-encoder"))


def test_text_hidden_state_vector_is_eq1_on_k_sampled_blocks_of_the_text(model):
    from icm_core.data.tokens import sample_blocks, token_blocks
    from icm_core.generator.task_vectors import text_hidden_state_vector

    tokenizer = helpers.tiny_tokenizer()
    texts = [helpers.SAMPLE_TEXT, helpers.OTHER_TEXT]
    vector = text_hidden_state_vector(model, tokenizer, texts, num_samples=3, sample_tokens=16, seed=5)
    expected = hidden_state_task_vector(model, sample_blocks(token_blocks(texts, tokenizer, 16), 3, 5))
    assert torch.equal(vector, expected)
    other_k = text_hidden_state_vector(model, tokenizer, texts, num_samples=6, sample_tokens=16, seed=5)
    assert not torch.equal(vector, other_k)  # k is honoured


def test_task_vector_kind_names_source_model_and_encoder():
    from icm_core.generator.config import TaskVectorConfig
    from icm_core.generator.task_vectors import check_task_vector_kind, task_vector_kind

    base = task_vector_kind(TaskVectorConfig(hidden_from="base", num_samples=4), "smollm2-135m")
    assert base == "hidden_state:base:smollm2-135m"
    assert base == task_vector_kind(TaskVectorConfig(hidden_from="base", num_samples=32, seed=9), "smollm2-135m")
    assert task_vector_kind(TaskVectorConfig(), "m") == "hidden_state:finetuned:m"
    assert task_vector_kind(TaskVectorConfig(source="description"), "m") == "description:minilm"
    check_task_vector_kind(base, base)
    check_task_vector_kind(None, base)  # an old generator without a recorded kind
    with pytest.raises(ValueError, match="hidden_state:finetuned:m"):
        check_task_vector_kind(base, "hidden_state:finetuned:m")
