"""Category-level intervals of a leave-out run: differences of the share of the gap recovered, categories resampled.

A claim about categories a generator has never seen is a claim about categories, so this resamples the categories
themselves (paired: the same resampled categories for both methods) from a run's ``per_category.csv`` and prints,
for each comparison, the macro difference with its 95% percentile interval, a verdict that says better or worse
only where the interval excludes zero, and the sign test. It is the report's own computation
(``icm_core.zeroshot.results.category_difference`` over ``icm_core.evaluation.stats.category_means``) with each
category's point estimate in place of its block-resampled draws (the CSV has no blocks), so for the same run its
intervals are slightly narrower than the report's ``ci95_category``.

    .venv/bin/python scripts/category_intervals.py results/zeroshot/per_category.csv --method icm_lora
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

from icm_core.zeroshot.results import category_difference


def read_gaps(path: Path) -> dict[str, dict[str, float]]:
    """``{method: {category: share of the gap recovered}}`` from a leave-out run's per-category CSV."""
    gaps: dict[str, dict[str, float]] = defaultdict(dict)
    with path.open(encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            gaps[row["method"]][row["category"]] = float(row["gap_recovered"])
    return dict(gaps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", type=Path, help="per_category.csv of a leave-out run")
    parser.add_argument("--method", default="icm_lora", help="the method compared with every other (icm_lora)")
    args = parser.parse_args()
    gaps = read_gaps(args.csv)
    if args.method not in gaps:
        raise SystemExit(f"{args.csv}: no method {args.method!r}; methods: {sorted(gaps)}")
    print(f"| {args.method} minus | categories | difference (points) | 95% interval | verdict | + / - | sign test p |")
    print("|---|---:|---:|---|---|---|---:|")
    for other in sorted(m for m in gaps if m not in (args.method, "base", "oracle")):
        a, b = gaps[args.method], gaps[other]
        cell = category_difference(a, b, a, b)
        low, high = cell["ci95"]
        sign = cell["sign_test"]
        print(
            f"| {other} | {cell['categories']} | {100 * cell['difference']:+.1f} | [{100 * low:+.1f}, "
            f"{100 * high:+.1f}] | {cell['verdict']} | {sign['positive']} / {sign['negative']} | {sign['p']:.3g} |"
        )


if __name__ == "__main__":
    main()
