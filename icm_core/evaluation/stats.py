"""Uncertainty of the reported comparisons: paired bootstrap intervals over test blocks, and spread across seeds.

Paired bootstrap. Every method is scored on the same test blocks (``icm_core.evaluation.perplexity`` keeps the NLL sum
and token count of each block). The comparison of method ``a`` with reference ``b`` is the relative PPL
difference

    d = PPL_a / PPL_b - 1 = exp((sum_i NLL_a,i - sum_i NLL_b,i) / sum_i tokens_i) - 1

(negative: ``a`` is better). Its 95% interval resamples the *blocks* with replacement, the same blocks for
both methods (that is the pairing: the block-to-block variation both share cancels), recomputes ``d`` each
time, and takes the 2.5% and 97.5% percentiles. A difference is called better or worse only when the
interval excludes zero. With several seeds, each block's NLL is first averaged over the seeds (the seeds
are scored on the same blocks), so the interval is that of the seed-averaged comparison; the spread across
seeds is reported next to it.

For detection the resampled unit is the image; the statistic (a COCO mAP difference) is recomputed by the
caller's function on each resample (:func:`bootstrap_interval`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np


BOOTSTRAP_SAMPLES: int = 2000
"""Resamples per interval."""
LEVEL: float = 0.95
"""Coverage of the reported intervals."""
SEED: int = 0
"""Seed of the resampling (intervals are reproducible)."""


def relative_difference(nll_a: Sequence[float], nll_b: Sequence[float], tokens: Sequence[int]) -> float:
    """``PPL_a / PPL_b - 1`` from per-block NLL sums (nats) and token counts of the same blocks."""
    a, b, t = _arrays(nll_a, nll_b, tokens)
    return math.expm1((a.sum() - b.sum()) / t.sum())


def _arrays(nll_a, nll_b, tokens) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a, b, t = (np.asarray(x, dtype=np.float64) for x in (nll_a, nll_b, tokens))
    if not (a.shape == b.shape == t.shape) or a.ndim != 1:
        raise ValueError(f"paired blocks must match: {a.shape}, {b.shape}, {t.shape}")
    if a.size == 0:
        raise ValueError("no blocks to compare")
    if (t <= 0).any():
        raise ValueError("every block must have at least one token")
    return a, b, t


def resample_indices(
    n: int, samples: int = BOOTSTRAP_SAMPLES, seed: int = SEED, stream: int | None = None
) -> np.ndarray:
    """``[samples, n]`` indices drawn with replacement (the same draws for every comparison of one size).

    ``stream`` selects an independent set of draws for the same ``seed`` (one per stratum of a stratified
    bootstrap, so that two categories with as many blocks are not resampled alike); None is the seed's own."""
    rng = np.random.default_rng(seed if stream is None else [seed, stream])
    return rng.integers(0, n, size=(samples, n))


def percentile_interval(values: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The ``level`` percentile interval of bootstrap ``values`` (numpy's linear interpolation between order
    statistics); non-finite values (a resample where a statistic is undefined) are left out, and an interval of
    no finite value is (nan, nan)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return math.nan, math.nan
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(values, [tail, 1.0 - tail])
    return float(low), float(high)


def stratified_means(
    strata: Mapping[str, Mapping[str, Sequence[float]]], samples: int = BOOTSTRAP_SAMPLES, seed: int = SEED
) -> dict[str, dict[str, np.ndarray]]:
    """Bootstrap means of paired series within independent strata.

    ``strata`` is ``{stratum: {series: per-unit values}}`` (e.g. per category, per method, the NLL of each test
    block). Within a stratum every series is resampled with the same indices (paired); each stratum gets its own
    draws (stream = its position in sorted order). Returns ``{stratum: {series: [samples] resampled means}}``.

    Raises:
        ValueError: The series of a stratum differ in length, or a stratum has no units.
    """
    out: dict[str, dict[str, np.ndarray]] = {}
    for stream, name in enumerate(sorted(strata)):
        series = {k: np.asarray(v, dtype=np.float64) for k, v in strata[name].items()}
        sizes = {v.shape for v in series.values()}
        if len(sizes) != 1 or next(iter(sizes))[0] == 0:
            raise ValueError(f"stratum {name!r}: its series must be paired and non-empty, got shapes {sorted(sizes)}")
        idx = resample_indices(next(iter(sizes))[0], samples, seed, stream=stream)
        out[name] = {k: v[idx].mean(axis=1) for k, v in series.items()}
    return out


def category_means(
    values: Mapping[str, np.ndarray | float], samples: int = BOOTSTRAP_SAMPLES, seed: int = SEED
) -> np.ndarray:
    """Two-stage bootstrap of a mean over categories: ``[samples]`` resampled means.

    Each resample draws the categories with replacement (:func:`resample_indices`, the seed's own stream, so every
    comparison over the same number of categories draws the same categories: paired across methods) and takes, for
    each drawn category, its value in the same resample of the within-category bootstrap: ``values[c]`` is either
    an array of ``samples`` draws (e.g. a category's share of the gap with its test blocks resampled, from
    :func:`stratified_means`) or one number (categories resampled only, e.g. from a per-category CSV).

    Raises:
        ValueError: No categories, or a category's draws are not ``samples`` long.
    """
    if not values:
        raise ValueError("no categories to resample")
    rows = []
    for name in sorted(values):
        row = np.asarray(values[name], dtype=np.float64)
        if row.ndim == 0:
            row = np.full(samples, float(row))
        if row.shape != (samples,):
            raise ValueError(f"category {name!r}: {row.shape[0]} draws, want one per resample ({samples})")
        rows.append(row)
    matrix = np.stack(rows)  # [categories, samples]
    idx = resample_indices(len(rows), samples, seed)  # [samples, categories]
    return matrix[idx, np.arange(samples)[:, None]].mean(axis=1)


def sign_test(differences: Sequence[float]) -> dict[str, float | int]:
    """Exact two-sided sign test of paired differences (ties, exact zeros, left out): the counts of positive and
    negative differences and the probability of a split at least as uneven under a fair coin."""
    wins = sum(1 for d in differences if d > 0)
    losses = sum(1 for d in differences if d < 0)
    n = wins + losses
    if n == 0:
        return {"positive": 0, "negative": 0, "p": 1.0}
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / 2**n
    return {"positive": wins, "negative": losses, "p": min(1.0, 2 * tail)}


def paired_bootstrap(
    nll_a: Sequence[float],
    nll_b: Sequence[float],
    tokens: Sequence[int],
    samples: int = BOOTSTRAP_SAMPLES,
    level: float = LEVEL,
    seed: int = SEED,
) -> tuple[float, float]:
    """Percentile interval of ``PPL_a / PPL_b - 1`` over blocks resampled with replacement (paired)."""
    a, b, t = _arrays(nll_a, nll_b, tokens)
    idx = resample_indices(a.size, samples, seed)
    diffs = np.expm1((a[idx].sum(1) - b[idx].sum(1)) / t[idx].sum(1))
    return percentile_interval(diffs, level)


def bootstrap_interval(
    units: int,
    statistic: Callable[[np.ndarray], float],
    samples: int = BOOTSTRAP_SAMPLES,
    level: float = LEVEL,
    seed: int = SEED,
) -> tuple[float, float]:
    """Percentile interval of ``statistic(indices)`` over ``units`` resampled with replacement (any statistic,
    e.g. a detection mAP difference recomputed on resampled images)."""
    if units < 1:
        raise ValueError("no units to resample")
    values = np.array([statistic(row) for row in resample_indices(units, samples, seed)], dtype=np.float64)
    return percentile_interval(values, level)


def verdict(interval: Sequence[float] | None, lower_is_better: bool = True) -> str:
    """'better' / 'worse' only when the interval of (method - reference) excludes zero, else 'no clear difference'."""
    if interval is None:
        return "n/a"
    low, high = interval
    if low > 0:
        return "worse" if lower_is_better else "better"
    if high < 0:
        return "better" if lower_is_better else "worse"
    return "no clear difference"


def mean_blocks(per_seed: Sequence[Sequence[float]]) -> list[float]:
    """Block-wise mean over seeds (all seeds scored on the same blocks)."""
    arrays = [np.asarray(x, dtype=np.float64) for x in per_seed]
    if not arrays or any(a.shape != arrays[0].shape for a in arrays):
        raise ValueError("every seed must be scored on the same blocks")
    return list(np.mean(arrays, axis=0))


def seed_summary(values: Sequence[float | None]) -> dict[str, float | int | None]:
    """Mean, sample standard deviation (n-1; None for one seed), min, max and n over seeds."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"n": 0, "mean": None, "sd": None, "min": None, "max": None}
    n = len(vals)
    mean = math.fsum(vals) / n
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else None
    return {"n": n, "mean": mean, "sd": sd, "min": min(vals), "max": max(vals)}
