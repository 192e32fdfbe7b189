"""The paired bootstrap and the seed aggregation behind every interval and spread in the reports."""

from __future__ import annotations

import math

import numpy as np
import pytest

from icm_core.evaluation.stats import (
    bootstrap_interval,
    category_means,
    mean_blocks,
    paired_bootstrap,
    percentile_interval,
    relative_difference,
    seed_summary,
    sign_test,
    verdict,
)


def synthetic_blocks(n: int, shift_per_token: float, seed: int, tokens: int = 127):
    """Block NLL sums of a reference and of a method whose per-token NLL is ``shift_per_token`` higher on average,
    with block-to-block variation both share (what pairing removes) and a little independent noise."""
    rng = np.random.default_rng(seed)
    shared = rng.normal(3.0, 0.5, size=n) * tokens  # blocks differ a lot in difficulty
    ref = shared + rng.normal(0, 0.02 * tokens**0.5, size=n)
    method = shared + shift_per_token * tokens + rng.normal(0, 0.02 * tokens**0.5, size=n)
    return method.tolist(), ref.tolist(), [tokens] * n


def test_relative_difference_is_the_ppl_ratio():
    a, b, t = [10.0, 12.0], [9.0, 11.0], [5, 5]
    ppl_a, ppl_b = math.exp(22.0 / 10), math.exp(20.0 / 10)
    assert relative_difference(a, b, t) == pytest.approx(ppl_a / ppl_b - 1)
    assert relative_difference(a, a, t) == 0.0


def test_interval_covers_a_known_difference():
    """Over many synthetic data sets with a true 1% PPL difference, the 95% interval covers it about 95% of
    the time, and excludes zero."""
    shift = math.log(1.01)
    covered = 0
    for seed in range(60):
        a, b, t = synthetic_blocks(32, shift, seed)
        low, high = paired_bootstrap(a, b, t, samples=500, seed=seed)
        covered += low <= 0.01 <= high
        assert low > 0, "a 1% difference on 32 paired blocks is clearly detected"
        assert verdict((low, high)) == "worse"
    assert covered >= 50  # nominal 95% of 60 = 57; percentile intervals on 32 blocks run slightly narrow


def test_zero_difference_gives_an_interval_containing_zero():
    # Blocks that differ but whose differences cancel exactly: the interval straddles zero.
    rng = np.random.default_rng(5)
    b = rng.normal(380.0, 60.0, size=32)
    d = rng.normal(0.0, 2.0, size=16)
    a = b + np.concatenate([d, -d])
    low, high = paired_bootstrap(a, b, [127] * 32)
    assert low < 0 < high and verdict((low, high)) == "no clear difference"
    # No true difference: zero is inside the interval for about 95% of data sets.
    inside = 0
    for seed in range(40):
        a, b, t = synthetic_blocks(32, 0.0, 100 + seed)
        low, high = paired_bootstrap(a, b, t, samples=500, seed=seed)
        inside += low <= 0 <= high
    assert inside >= 34
    assert paired_bootstrap(b, b, t) == (0.0, 0.0)  # a method against itself


def test_pairing_makes_the_interval_narrow():
    """The shared block difficulty cancels: paired interval width ~ independent noise, not ~ block spread."""
    a, b, t = synthetic_blocks(32, math.log(1.002), 3)
    low, high = paired_bootstrap(a, b, t)
    assert high - low < 0.004
    # Unpaired (shuffling the reference's blocks) the same data cannot tell 0.2% from zero.
    rng = np.random.default_rng(0)
    b_shuffled = list(np.asarray(b)[rng.permutation(len(b))])
    assert (
        bootstrap_interval(
            32,
            lambda i: relative_difference(
                np.asarray(a)[i], np.asarray(b_shuffled)[rng.permutation(i)], np.asarray(t)[i]
            ),
        )[1]
        - bootstrap_interval(32, lambda i: relative_difference(np.asarray(a)[i], np.asarray(b)[i], np.asarray(t)[i]))[
            0
        ]
        > 0.004
    )


def test_interval_is_reproducible_and_checks_input():
    a, b, t = synthetic_blocks(16, 0.01, 1)
    assert paired_bootstrap(a, b, t) == paired_bootstrap(a, b, t)
    with pytest.raises(ValueError, match="match"):
        paired_bootstrap(a, b[:-1], t)
    with pytest.raises(ValueError, match="no blocks"):
        paired_bootstrap([], [], [])
    with pytest.raises(ValueError, match="token"):
        paired_bootstrap([1.0], [1.0], [0])


def test_bootstrap_interval_of_any_statistic():
    values = np.arange(100, dtype=float)
    low, high = bootstrap_interval(100, lambda idx: float(values[idx].mean()), samples=400)
    assert low < 49.5 < high and high - low < 25
    with pytest.raises(ValueError):
        bootstrap_interval(0, lambda idx: 0.0)


def test_verdict_only_when_zero_is_excluded():
    assert verdict((0.001, 0.02)) == "worse" and verdict((-0.02, -0.001)) == "better"
    assert verdict((-0.01, 0.01)) == "no clear difference" and verdict(None) == "n/a"
    assert verdict((0.1, 0.2), lower_is_better=False) == "better"  # mAP: higher is better


def test_seed_aggregation():
    summary = seed_summary([1.0, 2.0, 3.0])
    assert summary["mean"] == 2.0 and summary["sd"] == pytest.approx(1.0) and summary["n"] == 3
    assert (summary["min"], summary["max"]) == (1.0, 3.0)
    one = seed_summary([5.0])
    assert one["mean"] == 5.0 and one["sd"] is None
    assert seed_summary([None, 4.0, 6.0])["mean"] == 5.0
    assert seed_summary([])["n"] == 0
    assert mean_blocks([[1.0, 2.0], [3.0, 6.0]]) == [2.0, 4.0]
    with pytest.raises(ValueError, match="same blocks"):
        mean_blocks([[1.0], [1.0, 2.0]])


def test_the_category_bootstrap_covers_a_known_difference():
    """Synthetic categories whose true method difference is drawn around a known mean (+0.05): the 95% interval of
    the two-stage bootstrap (categories, then each category's own block-resampled draws) covers it in about 95% of
    repeated experiments, and excludes zero when the difference is large against the spread."""
    samples, true_mean, covered = 400, 0.05, 0
    for trial in range(60):
        rng = np.random.default_rng(100 + trial)
        effects = rng.normal(true_mean, 0.1, size=30)  # categories differ in how much the method helps
        draws = {f"c{i}": e + rng.normal(0, 0.02, size=samples) for i, e in enumerate(effects)}  # block noise
        low, high = percentile_interval(category_means(draws, samples, seed=trial))
        covered += low <= true_mean <= high
    assert 0.85 <= covered / 60 <= 1.0
    # Categories matter: the interval over categories is far wider than the blocks-only one would be.
    rng = np.random.default_rng(0)
    effects = rng.normal(0.3, 0.1, size=30)
    draws = {f"c{i}": e + rng.normal(0, 0.02, size=samples) for i, e in enumerate(effects)}
    low, high = percentile_interval(category_means(draws, samples))
    assert 0 < low < 0.3 < high and high - low > 0.04
    # A number per category (a per-category CSV) resamples the categories only.
    points = {f"c{i}": float(e) for i, e in enumerate(effects)}
    low_p, high_p = percentile_interval(category_means(points, samples))
    assert low_p <= float(np.mean(effects)) <= high_p
    with pytest.raises(ValueError, match="want one per resample"):
        category_means({"a": np.zeros(3)}, samples)
    with pytest.raises(ValueError, match="no categories"):
        category_means({}, samples)


def test_sign_test_is_the_exact_binomial():
    assert sign_test([1, 1, 1, 1, 1]) == {"positive": 5, "negative": 0, "p": 2 / 32}
    assert sign_test([1, -1, 0, 0]) == {"positive": 1, "negative": 1, "p": 1.0}
    assert sign_test([]) == {"positive": 0, "negative": 0, "p": 1.0}
    assert sign_test([1] * 9 + [-1])["p"] == pytest.approx(2 * 11 / 1024)
