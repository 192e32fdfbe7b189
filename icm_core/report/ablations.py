"""The ablation report: the paper's Tables 4-6 on our categories, from the results of pipeline variants.

* rank (Table 4): LoRA rank 1/2/4/8, one generator per rank, every method; with storage per rank;
* depth (Table 5): number of CVAE conv layers, at some ranks;
* task-vector source (Table 6): hidden-state (Eq. 1) vs description-embedding task vectors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from icm_core.config import METHOD_TITLES
from icm_core.infra.io import csv_text, write_json, write_text
from icm_core.report.plots import pyplot, save_figure
from icm_core.report.tables import GENERATED, fmt, human_bytes, markdown_table, methods_in


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if len(present) == len(values) and present else None


def variant_summary(variant: dict[str, Any]) -> dict[str, Any]:
    """Flat row of one variant: its parameters, per-category PPL per method, mean gain per method, bytes."""
    rows = variant["rows"]
    out: dict[str, Any] = {"group": variant["group"], "variant": variant["name"], **variant["params"]}
    out["lora_params"] = variant["flat_length"]
    for m in methods_in(rows):
        for r in rows:
            out[f"ppl_{m}_{r['category']}"] = r[f"ppl_{m}"]
        if m in GENERATED:
            out[f"mean_gain_{m}"] = _mean([r.get(f"gain_{m}") for r in rows])
            out[f"mean_gap_{m}"] = _mean([r.get(f"gap_{m}") for r in rows])
    for item in variant["storage"]:
        out["bytes: " + item["item"]] = item["bytes"]
    return out


def rank_table(variants: list[dict[str, Any]]) -> str:
    """Table 4: per rank, each category's PPL per method and each generated method's mean gain."""
    if not variants:
        return "_no rank variants_"
    cats = [r["category"] for r in variants[0]["rows"]]
    methods = [m for m in methods_in(variants[0]["rows"]) if m != "base"]
    headers = ["rank", "LoRA params"] + [f"{c} {METHOD_TITLES[m]}" for c in cats for m in methods]
    headers += [f"mean gain {METHOD_TITLES[m]}" for m in methods if m in GENERATED]
    body = []
    for v in variants:
        by_cat = {r["category"]: r for r in v["rows"]}
        cells = [v["params"]["rank"], f"{v['flat_length']:,}"]
        cells += [f"{by_cat[c][f'ppl_{m}']:.3f}" for c in cats for m in methods]
        cells += [fmt(_mean([r.get(f"gain_{m}") for r in v["rows"]]), ".1%") for m in methods if m in GENERATED]
        body.append(cells)
    return markdown_table(headers, body)


def rank_storage_table(variants: list[dict[str, Any]]) -> str:
    """Table 3 per rank: bytes of the checkpoints and of each generator."""
    if not variants:
        return "_no rank variants_"
    items = [s["item"] for s in variants[0]["storage"]]
    body = [
        [v["params"]["rank"]] + [human_bytes(next(s["bytes"] for s in v["storage"] if s["item"] == i)) for i in items]
        for v in variants
    ]
    return markdown_table(["rank", *items], body)


def icm_table(variants: list[dict[str, Any]], columns: list[str]) -> str:
    """Tables 5 and 6: ICM-LoRA PPL per category (LoRA in brackets) and mean gain, per variant."""
    if not variants:
        return "_no variants_"
    cats = [r["category"] for r in variants[0]["rows"]]
    headers = [*columns] + [f"{c} ICM-LoRA (LoRA)" for c in cats] + ["mean gain", "mean PPL vs LoRA"]
    body = []
    for v in variants:
        by_cat = {r["category"]: r for r in v["rows"]}
        cells = [v["params"][c] for c in columns]
        cells += [f"{by_cat[c]['ppl_icm_lora']:.3f} ({by_cat[c]['ppl_lora']:.3f})" for c in cats]
        cells += [
            fmt(_mean([r.get("gain_icm_lora") for r in v["rows"]]), ".1%"),
            fmt(_mean([r.get("gap_icm_lora") for r in v["rows"]]), "+.2%"),
        ]
        body.append(cells)
    return markdown_table(headers, body)


def plot_gain_vs_rank(variants: list[dict[str, Any]], path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ranks = [v["params"]["rank"] for v in variants]
    for m in [m for m in methods_in(variants[0]["rows"]) if m in GENERATED]:
        gains = [_mean([r.get(f"gain_{m}") for r in v["rows"]]) for v in variants]
        ax.plot(ranks, [float("nan") if g is None else 100 * g for g in gains], marker="o", label=METHOD_TITLES[m])
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.set_xlabel("LoRA rank")
    ax.set_ylabel("share of the fine-tuning gain recovered (%)")
    ax.set_title("Generated adapters vs LoRA rank")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def ablation_markdown(groups: dict[str, list[dict[str, Any]]], categories: list[str]) -> str:
    lines = [
        "# ICM-LoRA ablations",
        "",
        f"Categories: {', '.join(categories)}. Every variant is a full pipeline run (one generator trained on all "
        "these categories); PPL on each category's held-out test split, lower is better. *Gain* is the share of "
        "the fine-tuning gain recovered: (PPL base - PPL method) / (PPL base - PPL LoRA).",
        "",
        "## LoRA rank (paper Table 4)",
        "",
        rank_table(groups.get("rank", [])),
        "",
        "![gain vs rank](gain_vs_rank.png)" if groups.get("rank") else "",
        "",
        "## Storage per rank (paper Table 3)",
        "",
        rank_storage_table(groups.get("rank", [])),
        "",
        "## Number of CVAE conv layers (paper Table 5)",
        "",
        icm_table(groups.get("depth", []), ["conv layers", "rank"]),
        "",
        "## Task-vector source (paper Table 6)",
        "",
        icm_table(groups.get("source", []), ["task vector"]),
        "",
    ]
    return "\n".join(lines)


def write_ablation_report(out: Path, variants: list[dict[str, Any]]) -> dict[str, Any]:
    """Write ablations.md / ablations.json / ablations.csv and the gain-vs-rank figure into ``out``; returns the
    one-row-per-variant summary."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for v in variants:
        groups.setdefault(v["group"], []).append(v)
    if "rank" in groups:
        groups["rank"].sort(key=lambda v: v["params"]["rank"])
        plot_gain_vs_rank(groups["rank"], out / "gain_vs_rank.png")
    categories = [r["category"] for r in variants[0]["rows"]]
    summaries = [variant_summary(v) for v in variants]
    write_json(out / "ablations.json", {"categories": categories, "variants": variants, "summary": summaries})
    write_text(out / "ablations.csv", csv_text(summaries))
    write_text(out / "ablations.md", ablation_markdown(groups, categories))
    return {"summary": summaries}
