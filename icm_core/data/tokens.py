"""Token blocks: a tokenised text stream cut into fixed-length blocks, and a seeded choice of blocks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from icm_core.data.text import DataError


if TYPE_CHECKING:  # torch is imported lazily: reading and splitting text does not need it
    import torch


__all__ = ["sample_blocks", "token_blocks"]


def token_blocks(texts: Sequence[str], tokenizer: Any, seq_len: int, max_blocks: int | None = None) -> torch.Tensor:
    """Tokenise texts into one stream and cut it into non-overlapping blocks of ``seq_len`` tokens.

    Each text is tokenised without special tokens; ``tokenizer.eos_token_id`` separates consecutive
    texts. The remainder shorter than ``seq_len`` is dropped. With ``max_blocks``, tokenisation stops
    once enough tokens for that many blocks exist and only the first ``max_blocks`` blocks are returned.

    Args:
        texts: Documents, in order.
        tokenizer: A Hugging Face tokenizer with an ``eos_token_id``.
        seq_len: Tokens per block.
        max_blocks: Optional cap on the number of blocks.

    Returns:
        A ``torch.long`` tensor of shape ``[num_blocks, seq_len]``.

    Raises:
        ValueError: ``seq_len`` / ``max_blocks`` < 1 or the tokenizer has no EOS token.
        DataError: The texts give fewer than ``seq_len`` tokens (zero blocks).
    """
    import torch

    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if max_blocks is not None and max_blocks < 1:
        raise ValueError(f"max_blocks must be >= 1 or None, got {max_blocks}")
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; documents cannot be separated")
    needed = None if max_blocks is None else max_blocks * seq_len
    ids: list[int] = []
    batch_size = 32
    texts = [t for t in texts if t]
    for start in range(0, len(texts), batch_size):
        batch = list(texts[start : start + batch_size])
        encoded = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
        for doc_ids in encoded:
            if ids:
                ids.append(eos)
            ids.extend(doc_ids)
        if needed is not None and len(ids) >= needed:
            break
    count = len(ids) // seq_len
    if max_blocks is not None:
        count = min(count, max_blocks)
    if count == 0:
        raise DataError(
            f"only {len(ids)} tokens in {len(texts)} text(s); need at least seq_len={seq_len} for one block"
        )
    return torch.tensor(ids[: count * seq_len], dtype=torch.long).view(count, seq_len)


def sample_blocks(blocks: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Choose ``n`` distinct rows of ``blocks`` deterministically (all rows, shuffled, if there are fewer).

    Args:
        blocks: ``[N, seq_len]`` token blocks.
        n: How many rows to pick (>= 1).
        seed: Seed of the choice; the same seed and inputs give the same rows in the same order.

    Returns:
        A ``[min(n, N), seq_len]`` tensor.
    """
    import torch

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if blocks.dim() != 2 or blocks.shape[0] == 0:
        raise ValueError(f"expected a non-empty [N, seq_len] tensor, got shape {tuple(blocks.shape)}")
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(blocks.shape[0], generator=generator)[: min(n, blocks.shape[0])]
    return blocks[index]
