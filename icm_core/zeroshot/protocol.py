"""The leave-out protocol for categories the generator has never seen: folds, baselines and the gap metric.

Categories are split into K deterministic folds. For each fold, everything trained (the generator, the
mean LoRA, the multi-task LoRA, the k-NN library) sees only the other folds' categories; every held-out
category is then scored with

    gap recovered = (NLL_base - NLL_method) / (NLL_base - NLL_oracle)

on its own test blocks, where the oracle is its own fine-tuned LoRA (the ceiling). Intervals are paired
bootstrap intervals over test blocks: one resample of a category's block indices is applied to every
method at once (the same blocks for base, oracle and the method), and the macro average resamples every
category independently. Nothing here imports Prefect.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F


__all__ = [
    "BASELINES",
    "METHODS",
    "SCALING_PREFIX",
    "assert_no_leakage",
    "bootstrap_gap",
    "cross_category_matrix",
    "gap_recovered",
    "knn_weights",
    "make_folds",
    "scaling_curve",
    "scaling_size",
    "scaling_subsets",
    "shuffled_partner",
    "summarize",
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
    "icm_shuffled",
    "icm_mean_condition",
)
"""Every method of the protocol, in report order (names as in the report and ``summary.json``)."""
BASELINES: tuple[str, ...] = ("mean_lora", "multitask_lora", "nn1", "knn_softmax")
"""The baselines ICM-LoRA zero-shot is compared with (win rates ``icm_lora_vs_<baseline>``)."""
CONTROLS: tuple[str, ...] = ("icm_shuffled", "icm_mean_condition")
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


def gap_recovered(base: float, oracle: float, method: float) -> float | None:
    """Share of the base-to-oracle NLL gap a method recovers; None when the oracle did not improve on base."""
    gap = base - oracle
    if gap <= 1e-9:
        return None
    return (base - method) / gap


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def bootstrap_gap(
    nll: Mapping[str, Mapping[str, Sequence[float]]],
    methods: Sequence[str],
    samples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """Gap recovered per category and macro-averaged, with paired bootstrap intervals over test blocks.

    Args:
        nll: ``{category: {method: per-block NLL}}``; every category needs ``base`` and ``oracle``, and all
            methods of a category are scored on the same blocks (paired).
        methods: The methods to score.
        samples: Bootstrap resamples.
        seed: Seed of the resampling.
        level: Interval coverage.

    Returns:
        ``{"per_category": {cat: {method: {"gap", "low", "high"}}}, "macro": {method: {"gap", "low", "high"}},
        "categories": [...]}``; categories whose oracle does not beat base are listed under ``"excluded"``.
    """
    rng = random.Random(seed)
    usable, excluded = [], []
    for cat in sorted(nll):
        if gap_recovered(_mean(nll[cat]["base"]), _mean(nll[cat]["oracle"]), 0.0) is None:
            excluded.append(cat)
        else:
            usable.append(cat)
    point = {
        cat: {m: gap_recovered(*(_mean(nll[cat][k]) for k in ("base", "oracle")), _mean(nll[cat][m])) for m in methods}
        for cat in usable
    }
    draws: dict[str, dict[str, list[float]]] = {cat: {m: [] for m in methods} for cat in usable}
    macro_draws: dict[str, list[float]] = {m: [] for m in methods}
    lo_q, hi_q = (1 - level) / 2, 1 - (1 - level) / 2
    for _ in range(samples):
        per_cat: dict[str, dict[str, float]] = {}
        for cat in usable:
            n = len(nll[cat]["base"])
            idx = [rng.randrange(n) for _ in range(n)]
            means = {k: _mean([nll[cat][k][i] for i in idx]) for k in {"base", "oracle", *methods}}
            gap = means["base"] - means["oracle"]
            per_cat[cat] = {m: (means["base"] - means[m]) / gap if abs(gap) > 1e-12 else math.nan for m in methods}
            for m in methods:
                draws[cat][m].append(per_cat[cat][m])
        for m in methods:
            macro_draws[m].append(_mean([per_cat[c][m] for c in usable]) if usable else math.nan)

    def interval(values: list[float]) -> tuple[float, float]:
        finite = sorted(v for v in values if math.isfinite(v))
        if not finite:
            return math.nan, math.nan
        return finite[int(lo_q * (len(finite) - 1))], finite[int(math.ceil(hi_q * (len(finite) - 1)))]

    per_category = {
        cat: {
            m: {"gap": point[cat][m], **dict(zip(("low", "high"), interval(draws[cat][m]), strict=True))}
            for m in methods
        }
        for cat in usable
    }
    macro = {
        m: {
            "gap": _mean([point[c][m] for c in usable]) if usable else math.nan,
            **dict(zip(("low", "high"), interval(macro_draws[m]), strict=True)),
        }
        for m in methods
    }
    return {"per_category": per_category, "macro": macro, "categories": usable, "excluded": excluded}


def cross_category_matrix(nll: Mapping[str, Mapping[str, float]], base: Mapping[str, float]) -> dict[str, Any]:
    """How distinct the categories are: each category's own LoRA scored on every category's test text.

    Args:
        nll: ``{target: {source: mean NLL of source's LoRA on target's test blocks}}``; every target needs its own
            LoRA (``nll[t][t]``).
        base: ``{target: mean NLL of the base model on those blocks}``.

    Returns:
        ``{"categories", "share": {target: {source: gap recovered}}, "summary"}``: the share of the target's own
        base-to-LoRA gap that ``source``'s LoRA recovers (1 on the diagonal; None where the target's own LoRA
        does not beat the base model). The summary gives the mean and largest off-diagonal share and the targets
        where another category's LoRA does better than the own one (share > 1).
    """
    names = sorted(nll)
    missing = [f"{t} <- {s}" for t in names for s in names if s not in nll[t]]
    missing += [f"{t} <- base" for t in names if t not in base]
    if missing:
        raise ValueError(f"cross-category NLL is missing {missing[:5]}")
    share = {t: {s: gap_recovered(base[t], nll[t][t], nll[t][s]) for s in names} for t in names}
    off = [v for t in names for s, v in share[t].items() if s != t and v is not None]
    beaten = {
        t: max((s for s in names if s != t), key=lambda s: share[t][s])
        for t in names
        if share[t][t] is not None and any(share[t][s] > 1 for s in names if s != t)
    }
    summary = {
        "categories": len(names),
        "scored_targets": sum(share[t][t] is not None for t in names),
        "mean_off_diagonal": _mean(off) if off else None,
        "max_off_diagonal": max(off) if off else None,
        "targets_beaten_by_another_lora": beaten,
    }
    return {"categories": names, "share": share, "summary": summary}


def win_rate(per_category: Mapping[str, Mapping[str, Mapping[str, float]]], method: str, other: str) -> float | None:
    """Share of categories where ``method`` recovers more of the gap than ``other`` (ties count half)."""
    cats = [c for c in per_category if method in per_category[c] and other in per_category[c]]
    if not cats:
        return None
    score = 0.0
    for c in cats:
        a, b = per_category[c][method]["gap"], per_category[c][other]["gap"]
        score += 1.0 if a > b else 0.5 if a == b else 0.0
    return score / len(cats)


def summarize(
    nll: Mapping[str, Mapping[str, Sequence[float]]],
    folds: Sequence[Sequence[str]],
    samples: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """The protocol's results: intervals (see :func:`bootstrap_gap`), win rates and the ``summary.json`` payload.

    ``summary`` holds ``{"categories", "folds", "macro_gain": {method: share}, "win_rate":
    {"icm_lora_vs_<other>": share}}`` (shares in [0, 1] of the gap; base is 0 and oracle 1 by definition).
    ``nll`` may hold only some folds' categories (an interim report): ``folds_evaluated`` counts the folds whose
    categories are all in it and ``complete`` says whether that is every fold.
    """
    methods = [m for m in METHODS if all(m in nll[c] for c in nll)]
    scaled = {m for c in nll for m in nll[c] if scaling_size(m) is not None and all(m in nll[x] for x in nll)}
    methods += sorted(scaled, key=scaling_size)
    result = bootstrap_gap(nll, methods, samples, seed)
    wins = {
        f"icm_lora_vs_{other}": win_rate(result["per_category"], "icm_lora", other)
        for other in (*BASELINES, *CONTROLS)
        if other in methods and "icm_lora" in methods
    }
    if "icm_functional" in methods:  # the generator variant aimed at unseen categories
        wins.update(
            {
                f"icm_functional_vs_{other}": win_rate(result["per_category"], "icm_functional", other)
                for other in (*BASELINES, "icm_lora")
                if other in methods
            }
        )
    best_baseline = max((m for m in BASELINES if m in methods), key=lambda m: result["macro"][m]["gap"], default=None)
    evaluated = [fold for fold in folds if all(c in nll for c in fold)]
    total = sum(len(fold) for fold in folds)  # every fold's training set is the other folds' categories
    summary = {
        "categories": len(nll),
        "protocol_categories": total,
        "scored_categories": len(result["categories"]),
        "folds": len(folds),
        "folds_evaluated": len(evaluated),
        "complete": len(evaluated) == len(folds),
        "macro_gain": {m: result["macro"][m]["gap"] for m in methods},
        "macro_gain_ci95": {m: [result["macro"][m]["low"], result["macro"][m]["high"]] for m in methods},
        "win_rate": wins,
        "best_baseline": best_baseline,
        "excluded_categories": result["excluded"],
    }
    if scaled and "icm_lora" in methods and evaluated:
        summary["scaling"] = scaling_curve(result["macro"], sorted(scaled, key=scaling_size), evaluated, total)
    return {**result, "summary": summary, "methods": methods}


def is_interim(summary: Mapping[str, Any]) -> bool:
    """Whether a :func:`summarize` summary covers only some folds (a summary without ``complete`` predates
    interim reports and was complete)."""
    return not summary.get("complete", True)


def scaling_curve(
    macro: Mapping[str, Mapping[str, float]], scaled: Sequence[str], folds: Sequence[Sequence[str]], n: int
) -> list[dict[str, Any]]:
    """Zero-shot macro gain (with its interval) against the number of training categories: one point per
    scaling method, then ``icm_lora`` at the full training sets of ``folds`` (the scored folds, out of ``n``
    categories in all; their mean size, and ``per_fold`` lists them, since folds may differ by one)."""
    full = [n - len(fold) for fold in folds]
    points = [{"training_categories": scaling_size(m), "method": m} for m in scaled]
    points.append({"training_categories": sum(full) / len(full), "per_fold": full, "method": "icm_lora"})
    for point in points:
        cell = macro[point["method"]]
        point.update(macro_gain=cell["gap"], ci95=[cell["low"], cell["high"]])
    return points
