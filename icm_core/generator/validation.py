"""Early stopping of the generator on the validation split: score generated adapters through the base model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from icm_core.data.config import DataConfig
from icm_core.data.splits import read_splits
from icm_core.evaluation.perplexity import eval_blocks, score_blocks
from icm_core.lora.adapters import (
    first_adapted_layer,
    merged_state_into,
)
from icm_core.models.base_model import (
    load_tokenizer,
    shared_base_model,
)
from icm_core.models.config import ModelConfig


class ValidationScorer:
    """Scores LoRA states on the categories' validation splits. ``scorer(states)`` is the criterion the
    generator's early stopping minimises; ``scorer.per_category(states)`` gives each category's validation NLL.
    Each state is merged into the shared base model in turn (``merged_state_into``) and scored on
    ``max_tokens`` of that category's validation split (evenly spaced blocks, tokenised once here).

    Criteria (``CVAEConfig.val_criterion``):

    - ``"mean_nll"``: the validation NLL per token, averaged over categories.
    - ``"worst_gap"``: the largest share of a category's base-to-LoRA validation gap that its generated adapter
      leaves unrecovered, ``max_c (nll_c - lora_c) / (base_c - lora_c)``: the worst category decides, so
      training does not stop while one category still lags behind the others. Needs ``reference``, each
      category's ``(base, LoRA)`` validation NLL (:meth:`with_reference`); a category whose LoRA does not beat
      the base model on validation by :data:`MIN_VALIDATION_GAP` is left out of it.
    """

    def __init__(
        self,
        blocks: dict[str, Any],
        model_cfg: ModelConfig,
        adapter_config: dict[str, Any],
        batch_size: int = 8,
        criterion: str = "mean_nll",
        reference: dict[str, tuple[float, float]] | None = None,
    ) -> None:
        if criterion not in ("mean_nll", "worst_gap"):
            raise ValueError(f"val_criterion: unknown criterion {criterion!r} (mean_nll, worst_gap)")
        self.blocks, self.model_cfg, self.adapter_config, self.batch_size = (
            blocks,
            model_cfg,
            adapter_config,
            batch_size,
        )
        self.criterion, self.reference = criterion, reference

    def per_category(self, states: dict[str, dict[str, torch.Tensor] | None]) -> dict[str, float]:
        """Validation NLL per token of each category's state (``None``: the base model itself)."""
        out = {}
        with shared_base_model(self.model_cfg) as base:
            for name in sorted(set(states) & set(self.blocks)):
                state = states[name]
                if state is None:
                    result = score_blocks(base, self.blocks[name], self.batch_size)
                else:
                    where = f"generated adapter for {name!r}"
                    start = first_adapted_layer(state)
                    with merged_state_into(base, state, self.adapter_config, where) as model:
                        result = score_blocks(model, self.blocks[name], self.batch_size, start)
                out[name] = result.nll_nats / result.tokens
        return out

    def with_reference(self, lora_states: dict[str, dict[str, torch.Tensor]]) -> ValidationScorer:
        """This scorer with each category's base-model and LoRA validation NLL as the worst-gap reference."""
        base = self.per_category(dict.fromkeys(lora_states))
        lora = self.per_category(lora_states)
        self.reference = {name: (base[name], lora[name]) for name in lora}
        return self

    def unrecovered(self, values: dict[str, float]) -> dict[str, float]:
        """Each category's share of its base-to-LoRA validation gap left unrecovered (0: as good as the LoRA)."""
        if self.reference is None:
            raise ValueError("the worst_gap criterion needs each category's base and LoRA validation NLL")
        return {
            name: (values[name] - lora) / (base - lora)
            for name, (base, lora) in self.reference.items()
            if name in values and base - lora >= MIN_VALIDATION_GAP
        }

    def criterion_of(self, values: dict[str, float]) -> float:
        """The stopping criterion of per-category validation NLLs (:meth:`per_category`'s output)."""
        if self.criterion == "worst_gap":
            shortfalls = self.unrecovered(values)
            if shortfalls:
                return max(shortfalls.values())
        return sum(values.values()) / len(values)

    def __call__(self, states: dict[str, dict[str, torch.Tensor]]) -> float:
        return self.criterion_of(self.per_category(states))


MIN_VALIDATION_GAP = 1e-4
"""Nats per token by which a category's LoRA must beat the base model on validation to count in the worst-gap
criterion (a smaller gap makes the share meaningless). When no category qualifies, the criterion is the mean
validation NLL."""


def validation_scorer(
    split_dirs: dict[str, str | Path],
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
    max_tokens: int,
    adapter_config: dict[str, Any],
    batch_size: int = 8,
    criterion: str = "mean_nll",
) -> ValidationScorer | None:
    """The :class:`ValidationScorer` of these categories. A category whose validation split is shorter than one
    block is left out; ``None`` when no category has a full block (the caller then trains to the ceiling)."""
    tokenizer = load_tokenizer(model_cfg)
    blocks = {}
    for name, folder in split_dirs.items():
        try:
            blocks[name] = eval_blocks(read_splits(folder).val, tokenizer, data_cfg.seq_len, max_tokens)
        except ValueError:
            continue  # fewer validation tokens than one block
    return ValidationScorer(blocks, model_cfg, adapter_config, batch_size, criterion) if blocks else None
