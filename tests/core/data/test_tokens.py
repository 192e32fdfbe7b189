"""Tests of icm_core.data.tokens: token blocks and a seeded choice of blocks."""

from __future__ import annotations

import pytest
import torch

from icm_core.data.text import DataError
from icm_core.data.tokens import sample_blocks, token_blocks


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(50)]
    vocab = {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>")


def test_token_blocks(tiny_tokenizer) -> None:
    texts = [" ".join(f"w{i}" for i in range(10)), "w1 w2 w3", "w4 w5"]  # 10 + 1 + 3 + 1 + 2 = 17 tokens
    blocks = token_blocks(texts, tiny_tokenizer, seq_len=4)
    assert blocks.dtype == torch.long and blocks.shape == (4, 4)
    flat = blocks.flatten().tolist()
    assert flat[:12] == [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 1, 3]  # eos (1) between documents, no bos
    assert 1 not in flat[:10]
    assert token_blocks(texts, tiny_tokenizer, seq_len=4, max_blocks=2).shape == (2, 4)
    assert token_blocks(texts, tiny_tokenizer, seq_len=17).shape == (1, 17)
    with pytest.raises(DataError, match="17 tokens"):
        token_blocks(texts, tiny_tokenizer, seq_len=18)


def test_sample_blocks() -> None:
    blocks = torch.arange(40).view(10, 4)
    a = sample_blocks(blocks, 3, seed=0)
    assert a.shape == (3, 4)
    assert torch.equal(a, sample_blocks(blocks, 3, seed=0))
    assert len({tuple(row.tolist()) for row in a}) == 3
    every = sample_blocks(blocks, 50, seed=1)
    assert every.shape == (10, 4)
    assert sorted(every[:, 0].tolist()) == list(range(0, 40, 4))
