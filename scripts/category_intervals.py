"""Category-level intervals of a leave-out run: differences of the share of the gap recovered, categories resampled.

A claim about categories a generator has never seen is a claim about categories, so this resamples the categories
themselves (paired: the same resampled categories for both methods) from a run's ``per_category.csv`` and prints,
for each comparison, the macro difference with its 95% percentile interval, a verdict that says better or worse
only where the interval excludes zero, and the sign test. It is the report's own computation
(``icm_core.zeroshot.results.category_difference`` over ``icm_core.evaluation.stats.category_means``) with each
category's point estimate in place of its block-resampled draws (the CSV has no blocks), so for the same run its
intervals are slightly narrower than the report's ``ci95_category``.

    .venv/bin/python scripts/category_intervals.py results/zeroshot/per_category.csv --method icm_lora [--by-family]
        [--oracle-choice mean_lora,multitask_lora,knn_softmax,icm_lora]

``--by-family`` repeats the table within each family; ``--oracle-choice`` prints what a perfect per-category choice
among the named methods would score (the ceiling of a selector with those candidates), with the categories
resampled.
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

import numpy as np

from icm_core.evaluation.stats import category_means, percentile_interval
from icm_core.zeroshot.results import category_difference


def read_gaps(path: Path) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """``{method: {category: share of the gap recovered}}`` and ``{category: family}`` from a leave-out run's
    per-category CSV (rows without a share, an excluded category's, are left out)."""
    gaps: dict[str, dict[str, float]] = defaultdict(dict)
    families: dict[str, str] = {}
    with path.open(encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if row["gap_recovered"] not in ("", "None"):
                gaps[row["method"]][row["category"]] = float(row["gap_recovered"])
                families[row["category"]] = row.get("family") or ""
    return dict(gaps), families


def table(gaps: dict[str, dict[str, float]], method: str, categories: set[str], label: str) -> None:
    """One markdown table: ``method`` minus every other method over ``categories``."""
    print(f"| {method} minus | {label}categories | difference (points) | 95% interval | verdict | + / - | sign p |")
    print("|---|---:|---:|---|---|---|---:|")
    for other in sorted(m for m in gaps if m not in (method, "base", "oracle")):
        a = {c: v for c, v in gaps[method].items() if c in categories}
        b = {c: v for c, v in gaps[other].items() if c in categories}
        cell = category_difference(a, b, a, b)
        if cell["difference"] is None:
            continue
        low, high = cell["ci95"]
        sign = cell["sign_test"]
        print(
            f"| {other} | {cell['categories']} | {100 * cell['difference']:+.1f} | [{100 * low:+.1f}, "
            f"{100 * high:+.1f}] | {cell['verdict']} | {sign['positive']} / {sign['negative']} | {sign['p']:.3g} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", type=Path, help="per_category.csv of a leave-out run")
    parser.add_argument("--method", default="icm_lora", help="the method compared with every other (icm_lora)")
    parser.add_argument("--by-family", action="store_true", help="also one table per family")
    parser.add_argument("--oracle-choice", help="comma-separated methods: score a perfect per-category choice")
    args = parser.parse_args()
    gaps, families = read_gaps(args.csv)
    if args.method not in gaps:
        raise SystemExit(f"{args.csv}: no method {args.method!r}; methods: {sorted(gaps)}")
    table(gaps, args.method, set(gaps[args.method]), "")
    if args.by_family:
        for family in sorted(set(families.values())):
            print(f"\nfamily {family}:\n")
            table(gaps, args.method, {c for c, f in families.items() if f == family}, f"{family} ")
    if args.oracle_choice:
        chosen = [m.strip() for m in args.oracle_choice.split(",") if m.strip()]
        unknown = sorted(set(chosen) - set(gaps))
        if unknown:
            raise SystemExit(f"--oracle-choice: no methods {unknown} in {args.csv}")
        common = set.intersection(*(set(gaps[m]) for m in chosen))
        best = {c: max(gaps[m][c] for m in chosen) for c in common}
        low, high = percentile_interval(category_means(best))
        print(f"\nperfect per-category choice among {', '.join(chosen)}: {100 * np.mean(list(best.values())):.1f}% "
              f"[{100 * low:.1f}, {100 * high:.1f}] over {len(best)} categories")  # fmt: skip


if __name__ == "__main__":
    main()
