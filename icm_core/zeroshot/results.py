"""The leave-out protocol's results: the share of the base-to-oracle gap each method recovers, with paired bootstrap
intervals, win rates, the cross-category matrix and the scaling curve (``summary.json``).

    gap recovered = (NLL_base - NLL_method) / (NLL_base - NLL_oracle)

on a held-out category's own test blocks, where the oracle is its own fine-tuned LoRA (the ceiling). Only reports
import this module (a presentation module: editing it re-renders reports and retrains nothing)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from icm_core.evaluation.stats import BOOTSTRAP_SAMPLES, LEVEL, SEED, percentile_interval, stratified_means
from icm_core.zeroshot.protocol import BASELINES, CONTROLS, METHODS, scaling_size


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
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = SEED,
    level: float = LEVEL,
) -> dict[str, Any]:
    """Gap recovered per category and macro-averaged, with paired bootstrap intervals over test blocks.

    The resampling is :func:`icm_core.evaluation.stats.stratified_means`: within a category every method is
    resampled on the same blocks (paired), each category independently; intervals are
    :func:`~icm_core.evaluation.stats.percentile_interval` (the rule every report uses).

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
    series = {cat: {k: nll[cat][k] for k in {"base", "oracle", *methods}} for cat in usable}
    means = stratified_means(series, samples, seed)
    draws: dict[str, dict[str, np.ndarray]] = {}
    for cat in usable:
        base, gap = means[cat]["base"], means[cat]["base"] - means[cat]["oracle"]
        defined = np.abs(gap) > 1e-12
        with np.errstate(divide="ignore", invalid="ignore"):
            draws[cat] = {m: np.where(defined, (base - means[cat][m]) / gap, np.nan) for m in methods}
    per_category = {
        cat: {
            m: {
                "gap": point[cat][m],
                **dict(zip(("low", "high"), percentile_interval(draws[cat][m], level), strict=True)),
            }
            for m in methods
        }
        for cat in usable
    }
    macro = {}
    for m in methods:
        stacked = np.stack([draws[c][m] for c in usable]).mean(axis=0) if usable else np.array([math.nan])
        low, high = percentile_interval(stacked, level)
        macro[m] = {"gap": _mean([point[c][m] for c in usable]) if usable else math.nan, "low": low, "high": high}
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
