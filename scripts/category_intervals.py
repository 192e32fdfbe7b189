"""Category-level intervals of a leave-out run: differences of the share of the gap recovered, categories resampled.

The leave-out report's intervals resample test blocks within each category. A claim about categories a generator
has never seen is a claim about categories, so this resamples the categories themselves (paired: the same resampled
categories for both methods) from the run's ``per_category.csv`` and prints, for each comparison, the macro
difference with its 95% percentile interval (``icm_core.evaluation.stats``, the rule every report uses) and a
verdict that says better or worse only where the interval excludes zero.

    .venv/bin/python scripts/category_intervals.py results/zeroshot/per_category.csv --method icm_lora
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

import numpy as np

from icm_core.evaluation.stats import BOOTSTRAP_SAMPLES, SEED, percentile_interval, resample_indices, verdict


def read_gaps(path: Path) -> dict[str, dict[str, float]]:
    """``{method: {category: share of the gap recovered}}`` from a leave-out run's per-category CSV."""
    gaps: dict[str, dict[str, float]] = defaultdict(dict)
    with path.open(encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            gaps[row["method"]][row["category"]] = float(row["gap_recovered"])
    return dict(gaps)


def paired_difference(
    a: dict[str, float], b: dict[str, float], samples: int = BOOTSTRAP_SAMPLES, seed: int = SEED
) -> tuple[float, tuple[float, float], int]:
    """Mean over categories of ``a - b``, its 95% interval with categories resampled, and the category count."""
    categories = sorted(set(a) & set(b))
    diffs = np.array([a[c] - b[c] for c in categories])
    draws = diffs[resample_indices(len(diffs), samples, seed)].mean(axis=1)
    return float(diffs.mean()), percentile_interval(draws), len(categories)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", type=Path, help="per_category.csv of a leave-out run")
    parser.add_argument("--method", default="icm_lora", help="the method compared with every other (icm_lora)")
    args = parser.parse_args()
    gaps = read_gaps(args.csv)
    if args.method not in gaps:
        raise SystemExit(f"{args.csv}: no method {args.method!r}; methods: {sorted(gaps)}")
    print(f"| {args.method} minus | categories | difference (points) | 95% interval | verdict |")
    print("|---|---:|---:|---|---|")
    for other in sorted(m for m in gaps if m not in (args.method, "base", "oracle")):
        mean, (low, high), n = paired_difference(gaps[args.method], gaps[other])
        word = verdict((low, high), lower_is_better=False)
        print(f"| {other} | {n} | {100 * mean:+.1f} | [{100 * low:+.1f}, {100 * high:+.1f}] | {word} |")


if __name__ == "__main__":
    main()
