"""Report lines of a leave-out run's category-level intervals: every method difference with the categories
resampled (overall and by family), the sign test, and the selector's picks and regret (from ``summary.json``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from icm_core.report.tables import fmt


__all__ = ["category_interval_lines"]


def category_interval_lines(summary: Mapping[str, Any]) -> list[str]:
    """The category-level intervals of every method difference, by family, and the selector's picks."""
    lines = [
        "",
        "## Differences with categories resampled",
        "",
        "Macro difference of the share of the gap (points), 95% interval with the categories resampled and each "
        "category's test blocks resampled within it (paired); better / worse only where the interval excludes zero; "
        "sign test over categories (ties left out).",
        "",
        "| difference | categories | points | 95% interval | verdict | + / - | sign test p |",
        "|---|---:|---:|---|---|---|---:|",
    ]

    def rows(table: Mapping[str, Any], prefix: str = "") -> list[str]:
        out = []
        for pair, cell in table.items():
            if cell["difference"] is None:
                continue
            low, high = cell["ci95"]
            sign = cell["sign_test"]
            out.append(
                f"| {prefix}`{pair}` | {cell['categories']} | {100 * cell['difference']:+.1f} | "
                f"[{fmt(100 * low, '+.1f')}, {fmt(100 * high, '+.1f')}] | {cell['verdict']} | "
                f"{sign['positive']} / {sign['negative']} | {sign['p']:.3g} |"
            )
        return out

    lines += rows(summary.get("ci95_category", {}))
    for family, cell in summary.get("family_ci95_category", {}).items():
        focus = {k: v for k, v in cell["differences"].items() if k.startswith(("selector_", "icm_lora_minus"))}
        lines += rows(focus, f"{family} ({cell['categories']}): ")
    selector = summary.get("selector")
    if selector:
        low, high = selector["mean_regret_ci95"]
        lines += [
            "",
            "**Selector**: picks "
            + ", ".join(f"`{k}` {v}" for k, v in selector["picks"].items())
            + f"; mean regret against the best of {', '.join(selector['regret_against'])} per category "
            f"{fmt(selector['mean_regret'], '.1%')} [{fmt(low, '.1%')}, {fmt(high, '.1%')}].",
        ]
    return lines
