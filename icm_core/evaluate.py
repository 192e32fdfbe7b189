"""Perplexity and bits-per-character on held-out text.

The test documents are joined with blank lines into one string, tokenised once with character
offsets, and cut into non-overlapping blocks. Every block's tokens after the first are predicted;
each predicted token covers the characters from the previous token's end to its own end, so

    PPL = exp(total NLL in nats / predicted tokens)
    BPC = (total NLL in nats / ln 2) / characters covered by the predicted tokens

The base model, the original LoRA and every generated adapter go through this same code.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from icm_core.config import EvalConfig
from icm_core.faults import fault_point


@dataclass(frozen=True)
class EvalBlocks:
    """Token blocks plus the number of characters each target token covers."""

    input_ids: torch.Tensor  # [N, T]
    target_chars: torch.Tensor  # [N, T-1] characters covered by tokens 1..T-1 of each block


@dataclass(frozen=True)
class LMScore:
    nll_nats: float
    tokens: int
    chars: int
    ppl: float
    bpc: float

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def eval_blocks(texts: list[str], tokenizer, seq_len: int, max_tokens: int) -> EvalBlocks:
    """Tokenise ``texts`` with offsets and cut into at most ``max_tokens // seq_len`` blocks."""
    text = "\n\n".join(t for t in texts if t.strip())
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = torch.tensor(enc["input_ids"], dtype=torch.long)
    ends = torch.tensor([end for _, end in enc["offset_mapping"]], dtype=torch.long)
    # Characters per token: from the previous token's end to this token's end (gaps included).
    chars = torch.diff(ends, prepend=torch.zeros(1, dtype=torch.long))
    n_blocks = min(len(ids) // seq_len, max(1, max_tokens // seq_len))
    if n_blocks == 0:
        raise ValueError(f"test text has {len(ids)} tokens, fewer than one block of {seq_len}")
    used = n_blocks * seq_len
    blocks = ids[:used].view(n_blocks, seq_len)
    target_chars = chars[:used].view(n_blocks, seq_len)[:, 1:]
    return EvalBlocks(blocks, target_chars)


@torch.no_grad()
def score_blocks(model: torch.nn.Module, blocks: EvalBlocks, batch_size: int = 8) -> LMScore:
    """Sum next-token NLL over all blocks and turn it into PPL and BPC."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll_total, token_total = 0.0, 0
    try:
        for batch in blocks.input_ids.split(batch_size):
            batch = batch.to(device)
            logits = model(input_ids=batch).logits[:, :-1, :].float()
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
            nll_total += nll.item()
            token_total += batch[:, 1:].numel()
            fault_point("evaluate.batch")
    finally:
        model.train(was_training)
    chars = int(blocks.target_chars.sum())
    return LMScore(
        nll_nats=nll_total,
        tokens=token_total,
        chars=chars,
        ppl=math.exp(nll_total / token_total),
        bpc=nll_total / math.log(2) / chars,
    )


def evaluate_lm(model: torch.nn.Module, tokenizer, texts: list[str], seq_len: int, cfg: EvalConfig) -> LMScore:
    """PPL and BPC of ``model`` on ``texts``."""
    return score_blocks(model, eval_blocks(texts, tokenizer, seq_len, cfg.max_tokens), cfg.batch_size)


def gain_recovered(ppl_base: float, ppl_lora: float, ppl_method: float) -> float | None:
    """Share of the fine-tuning gain a method recovers: (PPL_base - PPL_method) / (PPL_base - PPL_lora)."""
    gain = ppl_base - ppl_lora
    if abs(gain) < 1e-12:
        return None
    return (ppl_base - ppl_method) / gain
