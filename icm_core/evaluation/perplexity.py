"""Perplexity and bits-per-character on held-out text, kept per block so results can be resampled.

The test documents are joined with blank lines into one string, tokenised once with character
offsets, and cut into non-overlapping blocks of ``seq_len`` tokens. When the split holds more blocks
than the budget (``EvalConfig.max_tokens // seq_len``), evenly spaced blocks across the whole split are
scored (not only its first documents); otherwise every block is. Every block's tokens after the first
are predicted; each predicted token covers the characters from the previous token's end to its own
end, so

    PPL = exp(total NLL in nats / predicted tokens)
    BPC = (total NLL in nats / ln 2) / characters covered by the predicted tokens

The NLL sum, token count and character count of every block are returned too (``block_nll``,
``block_tokens``, ``block_chars``): the report's paired bootstrap resamples blocks from them
(``icm_core.evaluation.stats``). The base model, the original LoRA and every generated adapter go through this
same code on the same blocks.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from icm_core.evaluation.config import EvalConfig
from icm_core.infra.faults import fault_point
from icm_core.models.prefix import block_states, decoder_stack, layers_from


@dataclass(frozen=True)
class EvalBlocks:
    """Token blocks plus the number of characters each target token covers."""

    input_ids: torch.Tensor  # [N, T]
    target_chars: torch.Tensor  # [N, T-1] characters covered by tokens 1..T-1 of each block
    available: int = 0  # full blocks in the whole split (>= N)


@dataclass(frozen=True)
class LMScore:
    nll_nats: float
    tokens: int
    chars: int
    ppl: float
    bpc: float
    block_nll: list[float]
    block_tokens: list[int]
    block_chars: list[int]
    blocks_available: int = 0

    def as_dict(self) -> dict[str, float | int | list]:
        return asdict(self)


def spread_indices(available: int, wanted: int) -> list[int]:
    """``wanted`` block indices spread evenly over ``range(available)`` (all of them when wanted >= available)."""
    if wanted >= available:
        return list(range(available))
    return [int(i * available // wanted) for i in range(wanted)]


def eval_blocks(texts: list[str], tokenizer, seq_len: int, max_tokens: int) -> EvalBlocks:
    """Tokenise ``texts`` with offsets, cut into blocks and keep at most ``max_tokens // seq_len`` of them,
    evenly spaced over the split."""
    text = "\n\n".join(t for t in texts if t.strip())
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = torch.tensor(enc["input_ids"], dtype=torch.long)
    ends = torch.tensor([end for _, end in enc["offset_mapping"]], dtype=torch.long)
    # Characters per token: from the previous token's end to this token's end (gaps included).
    chars = torch.diff(ends, prepend=torch.zeros(1, dtype=torch.long))
    available = len(ids) // seq_len
    if available == 0:
        raise ValueError(f"test text has {len(ids)} tokens, fewer than one block of {seq_len}")
    keep = torch.tensor(spread_indices(available, max(1, max_tokens // seq_len)))
    used = available * seq_len
    blocks = ids[:used].view(available, seq_len)[keep]
    target_chars = chars[:used].view(available, seq_len)[keep][:, 1:]
    return EvalBlocks(blocks, target_chars, available)


def prefix_states(model: torch.nn.Module, blocks: EvalBlocks, start: int, batch_size: int) -> list[torch.Tensor]:
    """The hidden states entering decoder layer ``start`` for each batch of ``blocks``, from the shared prefix cache
    (``icm_core.models.prefix``): every adapter that leaves layers ``< start`` untouched gets the same states, so
    evaluating several adapters on the same blocks runs those layers once."""
    return list(block_states(model, blocks.input_ids, start, batch_size).split(batch_size))


@torch.no_grad()
def score_blocks(model: torch.nn.Module, blocks: EvalBlocks, batch_size: int = 8, start_layer: int = 0) -> LMScore:
    """Next-token NLL summed per block, and the totals turned into PPL and BPC.

    ``start_layer`` > 0 says the model differs from its base only in decoder layers ``>= start_layer`` (an adapter
    merged into those): the states entering that layer come from :func:`prefix_states` (computed once per block
    set) and only the layers from there on run. Same arithmetic as the whole forward, fewer layers run."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    block_nll: list[float] = []
    suffix = start_layer > 0 and decoder_stack(model) is not None
    states = prefix_states(model, blocks, start_layer, batch_size) if suffix else None
    try:
        with layers_from(model, start_layer) if states is not None else nullcontext():
            for i, batch in enumerate(blocks.input_ids.split(batch_size)):
                batch = batch.to(device)
                if states is not None:
                    logits = model(inputs_embeds=states[i], use_cache=False).logits
                else:
                    logits = model(input_ids=batch, use_cache=False).logits
                logits = logits[:, :-1, :].float()
                nll = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")  # [B, T-1]
                block_nll += nll.double().sum(dim=1).tolist()
                fault_point("evaluate.batch")
    finally:
        model.train(was_training)
    block_tokens = [blocks.input_ids.shape[1] - 1] * blocks.input_ids.shape[0]
    block_chars = [int(c) for c in blocks.target_chars.sum(dim=1)]
    nll_total, token_total, chars = math.fsum(block_nll), sum(block_tokens), sum(block_chars)
    return LMScore(
        nll_nats=nll_total,
        tokens=token_total,
        chars=chars,
        ppl=math.exp(nll_total / token_total),
        bpc=nll_total / math.log(2) / chars,
        block_nll=block_nll,
        block_tokens=block_tokens,
        block_chars=block_chars,
        blocks_available=blocks.available or blocks.input_ids.shape[0],
    )


def evaluate_lm(
    model: torch.nn.Module, tokenizer, texts: list[str], seq_len: int, cfg: EvalConfig, start_layer: int = 0
) -> LMScore:
    """PPL and BPC of ``model`` on ``texts`` (``start_layer``: see :func:`score_blocks`)."""
    blocks = eval_blocks(texts, tokenizer, seq_len, cfg.max_tokens)
    return score_blocks(model, blocks, cfg.batch_size, start_layer)


def gain_recovered(ppl_base: float, ppl_lora: float, ppl_method: float) -> float | None:
    """Share of the fine-tuning gain a method recovers: (PPL_base - PPL_method) / (PPL_base - PPL_lora)."""
    gain = ppl_base - ppl_lora
    if abs(gain) < 1e-12:
        return None
    return (ppl_base - ppl_method) / gain
