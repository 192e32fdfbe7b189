"""The leave-out protocol for categories the generator has never seen: folds, leakage checks and baselines.

Categories are split into K deterministic folds. For each fold, everything trained (the generator, the
mean LoRA, the multi-task LoRA, the k-NN library) sees only the other folds' categories; every held-out
category is then scored on its own test blocks against the base model and its own fine-tuned LoRA (the oracle):
:mod:`icm_core.zeroshot.results` turns the scores into the share of the gap recovered, with intervals. Nothing here
imports Prefect.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F


__all__ = [
    "BASELINES",
    "METHODS",
    "SCALING_PREFIX",
    "SELECTOR_CANDIDATES",
    "assert_no_leakage",
    "knn_weights",
    "make_folds",
    "scaling_size",
    "scaling_subsets",
    "shuffled_partner",
]

METHODS: tuple[str, ...] = (
    "base",
    "oracle",
    "mean_lora",
    "multitask_lora",
    "nn1",
    "knn_softmax",
    "icm_lora",
    "icm_functional",
    "selector",
    "icm_shuffled",
    "icm_mean_condition",
)
"""Every method of the protocol, in report order (names as in the report and ``summary.json``)."""
BASELINES: tuple[str, ...] = ("mean_lora", "multitask_lora", "nn1", "knn_softmax")
"""The baselines ICM-LoRA zero-shot is compared with (win rates ``icm_lora_vs_<baseline>``)."""
CONTROLS: tuple[str, ...] = ("icm_shuffled", "icm_mean_condition")
SELECTOR_CANDIDATES: tuple[str, ...] = ("multitask_lora", "mean_lora", "knn_softmax", "icm_lora")
"""The selector's candidates that the protocol also scores on the test split (its regret is measured against the
best of these per category; the training categories' own LoRAs, the other z draws, the mix and the fine-tune are
candidates too but are not scored on test)."""
"""Controls: ICM-LoRA with another held-out category's vector, and with the mean training condition."""
SCALING_PREFIX = "icm_lora@"
"""Method name prefix of the scaling curve's generators: ``icm_lora@8`` is ICM-LoRA zero-shot from a generator
trained on 8 of the fold's training categories (``icm_lora`` itself is the point with all of them)."""


# --------------------------------------------------------------------------------------------------
# Folds and leakage
# --------------------------------------------------------------------------------------------------


def make_folds(names: Sequence[str], k: int, seed: int = 0) -> list[list[str]]:
    """Split category names into ``k`` deterministic folds of near-equal size.

    The names are sorted, shuffled with ``random.Random(seed)`` and dealt round-robin; each fold is
    returned sorted. The result depends only on the set of names, ``k`` and ``seed``.

    Raises:
        ValueError: Duplicate names, ``k < 2``, or fewer than two categories per fold.
    """
    if len(set(names)) != len(names):
        raise ValueError(f"folds: duplicate category names in {sorted(names)}")
    if k < 2:
        raise ValueError(f"folds: need at least 2 folds, got {k}")
    if len(names) < 2 * k:
        raise ValueError(
            f"folds: {len(names)} categories cannot fill {k} folds with two held-out categories each "
            "(the shuffled-vector control needs two); use fewer folds or more categories"
        )
    order = sorted(names)
    random.Random(seed).shuffle(order)
    return [sorted(order[i::k]) for i in range(k)]


def assert_no_leakage(held_out: Sequence[str], seen: Mapping[str, Sequence[str]]) -> None:
    """Fail if anything a fold trained on (named by what it is) includes a held-out category.

    Args:
        held_out: The fold's held-out categories.
        seen: What each trained artefact saw, e.g. ``{"generator trajectories": [...], "multitask text": [...]}``.

    Raises:
        AssertionError: A held-out category reached a trained artefact (the message names both).
    """
    leaks = {what: sorted(set(names) & set(held_out)) for what, names in seen.items()}
    leaks = {what: names for what, names in leaks.items() if names}
    if leaks:
        raise AssertionError(
            "held-out categories leaked into training: " + "; ".join(f"{w}: {n}" for w, n in leaks.items())
        )


def shuffled_partner(held_out: Sequence[str]) -> dict[str, str]:
    """The shuffled-vector control's pairing: each held-out category gets the next one's vector (sorted order,
    wrapping), so no category keeps its own."""
    names = sorted(held_out)
    if len(names) < 2:
        raise ValueError("the shuffled-vector control needs at least two held-out categories in a fold")
    return {name: names[(i + 1) % len(names)] for i, name in enumerate(names)}


def scaling_subsets(train: Sequence[str], sizes: Sequence[int], seed: int) -> dict[int, list[str]]:
    """The scaling curve's training sets within one fold: for each size ``s`` below ``len(train)``, the first
    ``s`` names of one seeded shuffle of ``train`` (so the sets are nested: every larger set contains the
    smaller ones, and the curve measures adding categories, not swapping them). Each set is returned sorted;
    sizes that are not below ``len(train)`` are left out (the whole set is the protocol's own generator).

    Raises:
        ValueError: A size below 1.
    """
    if any(s < 1 for s in sizes):
        raise ValueError(f"zeroshot.scaling_sizes: sizes must be at least 1, got {list(sizes)}")
    order = sorted(train)
    random.Random(seed).shuffle(order)
    return {s: sorted(order[:s]) for s in sorted(set(sizes)) if s < len(order)}


def scaling_size(method: str) -> int | None:
    """The training-set size of a scaling-curve method name (``icm_lora@8`` -> 8), else None."""
    if not method.startswith(SCALING_PREFIX):
        return None
    tail = method[len(SCALING_PREFIX) :]
    return int(tail) if tail.isdigit() else None


# --------------------------------------------------------------------------------------------------
# Library baselines
# --------------------------------------------------------------------------------------------------


def knn_weights(
    query: torch.Tensor, keys: Mapping[str, torch.Tensor], k: int, temperature: float | None = None
) -> dict[str, float]:
    """Neighbours of ``query`` among ``keys`` by cosine similarity and their weights.

    ``temperature=None`` gives equal weights over the ``k`` nearest (``k=1``: the nearest neighbour);
    otherwise the weights are ``softmax(cos / temperature)`` over the ``k`` nearest. Ties are broken by name.

    Returns:
        ``{name: weight}`` for the chosen neighbours, weights summing to 1.
    """
    if not keys:
        raise ValueError("k-NN: no library categories")
    if k < 1:
        raise ValueError(f"k-NN: k must be >= 1, got {k}")
    names = sorted(keys)
    matrix = torch.stack([keys[n].double() for n in names])
    sims = F.cosine_similarity(matrix, query.double().unsqueeze(0), dim=1)
    order = sorted(range(len(names)), key=lambda i: (-float(sims[i]), names[i]))[: min(k, len(names))]
    chosen = sims[order]
    weights = (
        torch.full_like(chosen, 1 / len(order)) if temperature is None else torch.softmax(chosen / temperature, 0)
    )
    return {names[i]: float(w) for i, w in zip(order, weights, strict=True)}


# --------------------------------------------------------------------------------------------------
# Metric
# --------------------------------------------------------------------------------------------------
