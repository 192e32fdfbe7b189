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

from icm_core.evaluation.stats import (
    BOOTSTRAP_SAMPLES,
    LEVEL,
    SEED,
    category_means,
    percentile_interval,
    sign_test,
    stratified_means,
    verdict,
)
from icm_core.zeroshot.protocol import BASELINES, CONTROLS, METHODS, SELECTOR_CANDIDATES, scaling_size


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
    return {"per_category": per_category, "macro": macro, "categories": usable, "excluded": excluded, "draws": draws}


def category_difference(
    a: Mapping[str, np.ndarray | float],
    b: Mapping[str, np.ndarray | float],
    point_a: Mapping[str, float],
    point_b: Mapping[str, float],
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = SEED,
    level: float = LEVEL,
) -> dict[str, Any]:
    """Macro difference ``a - b`` over the categories both have, with its category-level interval
    (:func:`~icm_core.evaluation.stats.category_means`: categories resampled, and within each its block-resampled
    draws when ``a`` / ``b`` hold arrays, paired), a verdict (better / worse only where the interval excludes zero)
    and the sign test over categories."""
    cats = sorted(set(a) & set(b) & set(point_a) & set(point_b))
    if not cats:
        return {"categories": 0, "difference": None, "ci95": [None, None], "verdict": "n/a"}
    diffs = {c: np.asarray(a[c], dtype=np.float64) - np.asarray(b[c], dtype=np.float64) for c in cats}
    low, high = percentile_interval(category_means(diffs, samples, seed), level)
    point = [point_a[c] - point_b[c] for c in cats]
    return {
        "categories": len(cats),
        "difference": float(np.mean(point)),
        "ci95": [low, high],
        "verdict": verdict((low, high), lower_is_better=False),
        "sign_test": sign_test(point),
    }


def category_intervals(
    result: Mapping[str, Any],
    methods: Sequence[str],
    families: Mapping[str, str | None] | None = None,
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = SEED,
) -> dict[str, Any]:
    """Category-level intervals of every method difference (``"<a>_minus_<b>"``, each pair once, in method order),
    overall (``ci95_category``) and within each family (``family_ci95_category``, with the family's macro shares)."""
    cats = list(result["categories"])
    draws, per = result["draws"], result["per_category"]
    compared = [m for m in methods if m not in ("base", "oracle")]

    def table(subset: Sequence[str]) -> dict[str, Any]:
        out = {}
        for i, first in enumerate(compared):
            for second in compared[i + 1 :]:
                out[f"{first}_minus_{second}"] = category_difference(
                    {c: draws[c][first] for c in subset}, {c: draws[c][second] for c in subset},
                    {c: per[c][first]["gap"] for c in subset}, {c: per[c][second]["gap"] for c in subset},
                    samples, seed,
                )  # fmt: skip
        return out

    by_family: dict[str, Any] = {}
    for family in sorted({str((families or {}).get(c)) for c in cats}) if families else []:
        members = [c for c in cats if str(families.get(c)) == family]
        macro = {m: _mean([per[c][m]["gap"] for c in members]) for m in compared}
        by_family[family] = {"categories": len(members), "macro_gain": macro, "differences": table(members)}
    return {"ci95_category": table(cats), "family_ci95_category": by_family}


def selector_summary(
    per_category: Mapping[str, Mapping[str, Mapping[str, float]]],
    picks: Mapping[str, str],
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = SEED,
) -> dict[str, Any]:
    """How often the selector picked each candidate (``picks``: category -> winner name; ``lora:<category>`` names
    count as ``lora:*``) and its regret: per category, the best test-split share among the candidates the protocol
    also scores on test (:data:`~icm_core.zeroshot.protocol.SELECTOR_CANDIDATES`) minus the selector's, with a
    category-level interval of the mean."""
    cats = [c for c in sorted(per_category) if "selector" in per_category[c]]
    counts: dict[str, int] = {}
    for c in cats:
        name = picks.get(c, "unknown")
        key = "lora:*" if name.startswith("lora:") else name
        counts[key] = counts.get(key, 0) + 1
    regret = {}
    for c in cats:
        scored = [per_category[c][m]["gap"] for m in SELECTOR_CANDIDATES if m in per_category[c]]
        if scored:
            regret[c] = max(scored) - per_category[c]["selector"]["gap"]
    low, high = percentile_interval(category_means(regret, samples, seed)) if regret else (None, None)
    return {
        "picks": dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))),
        "pick_share": {k: v / len(cats) for k, v in counts.items()} if cats else {},
        "per_category_pick": {c: picks.get(c) for c in cats},
        "regret": regret,
        "mean_regret": _mean(list(regret.values())) if regret else None,
        "mean_regret_ci95": [low, high],
        "regret_against": [m for m in SELECTOR_CANDIDATES],
    }


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
    families: Mapping[str, str | None] | None = None,
    picks: Mapping[str, str] | None = None,
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
    if "selector" in methods:  # the product's default for a new category, against every other method
        wins.update(
            {
                f"selector_vs_{other}": win_rate(result["per_category"], "selector", other)
                for other in methods
                if other not in ("base", "oracle", "selector")
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
    summary.update(category_intervals(result, methods, families, samples, seed))
    if "selector" in methods:
        summary["selector"] = selector_summary(result["per_category"], picks or {}, samples, seed)
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
