"""The selector: a new category's adapter, chosen among everything the library can give, on its own samples.

No single zero-shot method is best on every category (``results/zeroshot``), and the new category's own text can
tell them apart: the k sample blocks its task vector is computed from are already read. Every candidate is scored
on those blocks and the lowest held-out NLL wins; a tie (within ``SelectorConfig.tie_nats`` nats a token) goes to
the cheapest candidate (:data:`CANDIDATE_COST`).

Candidates: adapters the library stores (the multi-task LoRA, the mean LoRA, every category's own LoRA), the
softmax k-NN adapter, the generator's adapters (one candidate per z draw), and two fitted on the samples: a
LoraHub-style weighted mix of the best few and a few-step fine-tune started from the multi-task LoRA.

The split rule. The k blocks are dealt into ``SelectorConfig.splits`` folds (a seeded permutation, round-robin).
A fitted candidate is fitted once per fold on the other folds' blocks and scored on that fold's (cross-fitting),
so every block is held out exactly once and no fitted candidate is ever scored on a block it was fitted on; a
stored candidate is fitted on nothing, so its score is its NLL on all k blocks. Every candidate's score is thus an
NLL over the same k blocks, and averaging over the folds stabilises it. A fitted winner is refitted on all k blocks.

The layers below the adapters run once for the sample blocks and are shared by every candidate
(:func:`icm_core.evaluation.perplexity.prefix_states`); only the adapted layers run per candidate. The caller
passes the sample blocks only: nothing here reads a split. Nothing here imports Prefect.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from icm_core.evaluation.perplexity import EvalBlocks, score_blocks
from icm_core.generator.config import SampleConfig
from icm_core.generator.generator import load_generator
from icm_core.lora.adapters import first_adapted_layer, merged_state_into, read_adapter
from icm_core.lora.arithmetic import weighted_delta_adapter
from icm_core.zeroshot.config import SelectorConfig
from icm_core.zeroshot.functional import functional_lm_loss
from icm_core.zeroshot.protocol import knn_weights


__all__ = [
    "CANDIDATE_COST",
    "Candidate",
    "Selection",
    "fold_indices",
    "generator_candidates",
    "knn_candidate",
    "select_adapter",
    "stored_candidate",
]

logger = logging.getLogger("icm_lora.selector")

CANDIDATE_COST: dict[str, int] = {"stored": 0, "knn": 1, "generator": 2, "mix": 3, "finetune": 4}
"""Cost rank of a candidate's kind (what it takes to produce and keep it): a tie goes to the lowest."""


@dataclass(frozen=True)
class Candidate:
    """One adapter the selector may choose: a LoRA state (peft key names) and its adapter config."""

    name: str
    kind: str
    state: Mapping[str, torch.Tensor]
    config: Mapping[str, Any]
    detail: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in CANDIDATE_COST:
            raise ValueError(f"candidate {self.name!r}: unknown kind {self.kind!r} (one of {sorted(CANDIDATE_COST)})")

    @property
    def cost(self) -> int:
        return CANDIDATE_COST[self.kind]


@dataclass
class Selection:
    """What the selector chose and why: ``scores`` has one row per candidate (name, kind, cost, held-out NLL in
    nats a token, per fold), lowest first; ``winner`` is the chosen adapter (refitted on all blocks if fitted)."""

    winner: Candidate
    scores: list[dict[str, Any]]
    folds: list[list[int]]
    seconds: dict[str, float]
    skipped: list[str]

    def table(self) -> list[dict[str, Any]]:
        """The scores as rows for a table (the winner marked)."""
        return [{**row, "chosen": row["name"] == self.winner.name} for row in self.scores]


def fold_indices(blocks: int, folds: int, seed: int) -> list[list[int]]:
    """The split rule: a seeded permutation of ``range(blocks)`` dealt round-robin into ``folds`` folds (each
    sorted). Every block is in exactly one fold.

    Raises:
        ValueError: Fewer blocks than folds (each fold needs a block to hold out).
    """
    if blocks < folds:
        raise ValueError(f"selector: {blocks} sample blocks cannot fill {folds} folds; give more text or fewer splits")
    order = torch.randperm(blocks, generator=torch.Generator().manual_seed(seed)).tolist()
    return [sorted(order[i::folds]) for i in range(folds)]


class _Scorer:
    """Per-block NLL of candidates on the sample blocks, the layers below the adapters run once (prefix states)."""

    def __init__(self, model: torch.nn.Module, blocks: torch.Tensor, batch_size: int) -> None:
        self.model, self.batch_size = model, batch_size
        self.blocks = EvalBlocks(blocks, torch.ones(blocks.shape[0], blocks.shape[1] - 1, dtype=torch.long))
        self.tokens = blocks.shape[1] - 1

    def __call__(self, candidate: Candidate) -> torch.Tensor:
        start = first_adapted_layer(candidate.state.keys())
        with merged_state_into(self.model, dict(candidate.state), dict(candidate.config), candidate.name) as merged:
            score = score_blocks(merged, self.blocks, self.batch_size, start)
        return torch.tensor(score.block_nll, dtype=torch.float64)

    def per_token(self, block_nll: torch.Tensor, index: Sequence[int]) -> float:
        return float(block_nll[list(index)].sum()) / (len(index) * self.tokens)


def _mix(parts: Sequence[Candidate], weights: Sequence[float], name: str) -> Candidate:
    state, config = weighted_delta_adapter([(p.state, p.config) for p in parts], weights)
    return Candidate(name, "mix", state, config, {"parts": [p.name for p in parts], "weights": list(weights)})


def _fit_mix(
    stored: Sequence[Candidate], nll: Mapping[str, torch.Tensor], fit: Sequence[int], score: _Scorer,
    cfg: SelectorConfig, cache: dict,
) -> tuple[Candidate, torch.Tensor]:  # fmt: skip
    """LoraHub-style: the ``mix_top`` best candidates on the fitting blocks, weights searched on those blocks
    (uniform, then Dirichlet(1) draws; the best of ``mix_trials`` kept). Scorings are shared across folds."""
    ranked = sorted(stored, key=lambda c: (score.per_token(nll[c.name], fit), c.cost, c.name))[: cfg.mix_top]
    gen = torch.Generator().manual_seed(cfg.seed)
    trials = [torch.full((len(ranked),), 1 / len(ranked), dtype=torch.float64)]
    for _ in range(cfg.mix_trials - 1):  # Dirichlet(1) draws: normalised exponentials, seeded by ``gen``
        gamma = torch.empty(len(ranked), dtype=torch.float64).exponential_(generator=gen)
        trials.append(gamma / gamma.sum())
    best = None
    for weights in trials:
        key = (tuple(c.name for c in ranked), tuple(round(float(w), 6) for w in weights))
        if key not in cache:
            mix = _mix(ranked, [float(w) for w in weights], "mix")
            cache[key] = (mix, score(mix))
        mix, block_nll = cache[key]
        value = score.per_token(block_nll, fit)
        if best is None or value < best[0]:
            best = (value, mix, block_nll)
    return best[1], best[2]


def _finetune(model: torch.nn.Module, start: Candidate, blocks: torch.Tensor, cfg: SelectorConfig) -> Candidate:
    """``finetune_steps`` AdamW steps on ``blocks`` from ``start``'s LoRA factors, through the frozen model."""
    lora = {k: v.detach().clone().float().requires_grad_(True) for k, v in start.state.items()}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW(list(lora.values()), lr=cfg.finetune_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    was_training = model.training
    model.eval()
    try:
        for _ in range(cfg.finetune_steps):
            pick = torch.randperm(blocks.shape[0], generator=gen)[: cfg.finetune_batch]
            loss = functional_lm_loss(model, lora, start.config, blocks[pick])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    state = {k: v.detach().clone() for k, v in lora.items()}
    return Candidate("finetune", "finetune", state, start.config, {"from": start.name, "steps": cfg.finetune_steps})


def select_adapter(
    model: torch.nn.Module,
    blocks: torch.Tensor,
    candidates: Sequence[Candidate],
    cfg: SelectorConfig,
    finetune_from: str | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> Selection:
    """Score every candidate on held-out sample blocks and choose the lowest NLL (ties: the cheapest).

    Args:
        model: The base model (adapters are merged into its weights for each scoring and removed after).
        blocks: ``[k, T]`` token blocks: the new category's own samples (the task vector's), nothing else.
        candidates: The stored, k-NN and generator candidates (unique names).
        cfg: Folds, tie tolerance, the mix and the fine-tune, the time budget.
        finetune_from: The candidate the fine-tune starts from (the multi-task LoRA); None: no fine-tune.
        clock: Seconds (the budget check; tests pass their own).

    Raises:
        ValueError: No candidates, duplicate names, or fewer blocks than folds.
    """
    started = clock()
    names = [c.name for c in candidates]
    if not candidates or len(set(names)) != len(names):
        raise ValueError(f"selector: needs candidates with unique names, got {names}")
    folds = fold_indices(int(blocks.shape[0]), cfg.splits, cfg.seed)
    everything = list(range(int(blocks.shape[0])))
    score = _Scorer(model, blocks, cfg.batch_size)
    nll = {c.name: score(c) for c in candidates}
    rows = [_row(c, nll[c.name], folds, score) for c in candidates]
    seconds = {"fixed": clock() - started}
    skipped: list[str] = []
    fitted: dict[str, Callable[[Sequence[int]], tuple[Candidate, torch.Tensor]]] = {}
    if cfg.mix_top >= 2 and len(candidates) >= 2:
        cache: dict = {}
        fitted["mix"] = lambda fit: _fit_mix(candidates, nll, fit, score, cfg, cache)
    if cfg.finetune_steps > 0 and finetune_from is not None:
        source = next((c for c in candidates if c.name == finetune_from), None)
        if source is None:
            raise ValueError(f"selector: finetune_from={finetune_from!r} is not a candidate ({names})")

        def finetuned(fit: Sequence[int]) -> tuple[Candidate, torch.Tensor]:
            tuned = _finetune(model, source, blocks[list(fit)], cfg)
            return tuned, score(tuned)

        fitted["finetune"] = finetuned
    refit: dict[str, Callable[[Sequence[int]], tuple[Candidate, torch.Tensor]]] = {}
    for name, fit_on in fitted.items():
        began = clock()
        if began - started > cfg.budget_s:
            skipped.append(name)
            logger.warning(
                "selector: %s skipped, %.1f s spent of a %.0f s budget", name, clock() - started, cfg.budget_s
            )
            continue
        held = torch.zeros(len(everything), dtype=torch.float64)
        per_fold = []
        for fold in folds:
            fit = [i for i in everything if i not in set(fold)]
            fitted_candidate, block_nll = fit_on(fit)
            held[fold] = block_nll[fold]
            per_fold.append(score.per_token(block_nll, fold))
        rows.append({"name": name, "kind": name, "cost": CANDIDATE_COST[name],
                     "nll": score.per_token(held, everything), "fold_nll": per_fold})  # fmt: skip
        refit[name] = fit_on
        seconds[name] = clock() - began
    rows.sort(key=lambda r: (r["nll"], r["cost"], r["name"]))
    lowest = rows[0]["nll"]
    chosen = min(
        (r for r in rows if r["nll"] <= lowest + cfg.tie_nats), key=lambda r: (r["cost"], r["nll"], r["name"])
    )
    if chosen["name"] in refit:  # fitted on the samples: its served version is fitted on all of them
        winner = refit[chosen["name"]](everything)[0]
    else:
        winner = next(c for c in candidates if c.name == chosen["name"])
    seconds["total"] = clock() - started
    return Selection(winner=winner, scores=rows, folds=folds, seconds=seconds, skipped=skipped)


def _row(candidate: Candidate, block_nll: torch.Tensor, folds: Sequence[Sequence[int]], score: _Scorer) -> dict:
    everything = range(block_nll.shape[0])
    value = score.per_token(block_nll, everything)
    if not math.isfinite(value):
        raise ValueError(f"selector: candidate {candidate.name!r} gives a non-finite NLL on the samples")
    return {"name": candidate.name, "kind": candidate.kind, "cost": candidate.cost, "nll": value,
            "fold_nll": [score.per_token(block_nll, f) for f in folds]}  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Candidates from a library on disk
# --------------------------------------------------------------------------------------------------


def stored_candidate(name: str, folder, kind: str = "stored") -> Candidate:
    """A stored PEFT adapter folder as a candidate (read now; errors name the folder)."""
    state, config = read_adapter(folder)
    return Candidate(name, kind, state, config, {"folder": str(folder)})


def knn_candidate(
    query: torch.Tensor, keys: Mapping[str, torch.Tensor], adapters: Mapping[str, Candidate], k: int,
    temperature: float,
) -> Candidate:  # fmt: skip
    """The softmax k-NN adapter (the protocol's rule, :func:`~icm_core.zeroshot.protocol.knn_weights`): the exact
    weighted mean of the weight changes of the ``k`` categories nearest to ``query`` by task-vector cosine."""
    weights = knn_weights(query, keys, k, temperature)
    chosen = sorted(weights)
    state, config = weighted_delta_adapter(
        [(adapters[n].state, adapters[n].config) for n in chosen], [weights[n] for n in chosen]
    )
    return Candidate("knn_softmax", "knn", state, config, {"weights": weights})


def generator_candidates(
    generator_path, query: torch.Tensor, kind: str | None, draws: int, name: str = "icm_lora"
) -> list[Candidate]:
    """One candidate per z draw (seeds ``0..draws-1``) of the generator at ``generator_path`` for ``query``."""
    generator = load_generator(generator_path)
    return [
        Candidate(
            f"{name}:z{seed}",
            "generator",
            generator.generate(query, SampleConfig(seed=seed, num_draws=1), where=str(generator_path), kind=kind),
            generator.adapter_config,
            {"generator": str(generator_path), "z_seed": seed},
        )
        for seed in range(draws)
    ]
