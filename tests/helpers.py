"""Builders for tests: a tiny seeded Llama causal LM, a character-level fast tokenizer, and a model folder
that ``ModelConfig(name_or_path=<folder>)`` loads through ``load_base_model`` / ``load_tokenizer``.

Nothing here downloads anything: the model is built from a config and the tokenizer from a vocabulary.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

from icm_core.lora.config import LoraTrainConfig
from icm_core.models.config import ModelConfig


PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
CHARS = string.printable  # 100 characters: letters, digits, punctuation and whitespace
HIDDEN = 32

SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. A stitch in time saves nine.\n"
    "def add(a, b):\n    return a + b\n\n"
    "Rain fell on the quiet town; the river rose, and the bridge held.\n"
)
OTHER_TEXT = (
    "0123456789 9876543210 1357924680 ++--**// [[]] {{}} <<>> == != <= >=\n"
    "ZZZ YYY XXX WWW VVV UUU TTT SSS RRR QQQ PPP OOO NNN MMM LLL KKK JJJ\n"
)


def char_vocab() -> dict[str, int]:
    vocab = {PAD: 0, EOS: 1, UNK: 2}
    for char in CHARS:
        vocab.setdefault(char, len(vocab))
    return vocab


def tiny_tokenizer():
    """Character-level ``PreTrainedTokenizerFast``: one token per character (unknown characters -> <unk>),
    so offsets are exact and every token covers exactly one character."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab=char_vocab(), unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, pad_token=PAD, unk_token=UNK)


def word_tokenizer(words: list[str]):
    """Word-level tokenizer (whitespace split) whose tokens cover several characters; for offset tests."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD: 0, EOS: 1, UNK: 2}
    for word in words:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, pad_token=PAD, unk_token=UNK)


def tiny_llama_config(vocab_size: int | None = None, num_layers: int = 2, **overrides):
    from transformers import LlamaConfig

    settings = dict(
        vocab_size=vocab_size or len(char_vocab()),
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        # A larger init than the default 0.02 gives the random model confident, input-dependent logits,
        # so a few LoRA steps visibly change its loss.
        initializer_range=0.2,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


def tiny_model(seed: int = 0, num_layers: int = 2, **overrides) -> torch.nn.Module:
    """A seeded, randomly initialised tiny Llama causal LM in float32 and eval mode."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(
            tiny_llama_config(num_layers=num_layers, **overrides), dtype=torch.float32
        )
    return model.eval()


def save_tiny_base(folder: str | Path, seed: int = 0) -> Path:
    """Save a tiny model and its tokenizer into ``folder`` (a normal transformers model folder)."""
    folder = Path(folder)
    tiny_model(seed).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def model_config(folder: str | Path) -> ModelConfig:
    return ModelConfig(name_or_path=str(folder), device="cpu", dtype="float32")


def lora_config(**overrides) -> LoraTrainConfig:
    """A small LoRA config for the tiny model (all layers, q/v, a handful of steps)."""
    settings = dict(
        rank=2,
        alpha=8.0,
        dropout=0.0,
        last_n_layers=None,
        steps=6,
        batch_size=2,
        lr=1e-2,
        warmup_steps=0,
        trajectory_size=3,
        checkpoint_every=2,
        seed=0,
    )
    settings.update(overrides)
    return LoraTrainConfig(**settings)


def char_blocks(text: str, seq_len: int, repeat: int = 1) -> torch.Tensor:
    """Token blocks [N, seq_len] of ``text`` (repeated) under the character tokenizer."""
    vocab = char_vocab()
    ids = [vocab.get(char, vocab[UNK]) for char in text * repeat]
    count = len(ids) // seq_len
    if count == 0:
        raise ValueError(f"text gives {len(ids)} tokens, fewer than seq_len={seq_len}")
    return torch.tensor(ids[: count * seq_len], dtype=torch.long).view(count, seq_len)


def random_lora_state(model: torch.nn.Module, cfg: LoraTrainConfig | None = None, seed: int = 0):
    """A real peft LoRA state dict of ``model`` (peft key names) with every tensor randomised.

    ``model`` is wrapped in place by peft; pass a fresh one.
    """
    from peft import get_peft_model

    from icm_core.lora.adapters import lora_config_for, lora_state_dict

    cfg = cfg or lora_config()
    peft_model = get_peft_model(model, lora_config_for(model, cfg, "tiny"))
    state = lora_state_dict(peft_model)
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.randn(value.shape, generator=generator) for key, value in state.items()}
