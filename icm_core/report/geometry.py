"""What the task vectors say about the adapters (``icm_core.zeroshot.geometry``), as markdown, JSON and a figure."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from icm_core.infra.io import write_json
from icm_core.report.plots import pyplot, save_figure
from icm_core.report.tables import fmt


REACH = {
    "mean_lora": "the mean LoRA",
    "nn1": "the 1-NN by task vector",
    "knn_softmax": "the softmax k-NN by task vector",
    "best_single_oracle": "the closest other adapter (oracle)",
    "span_oracle": "the best combination of all the others (projection, oracle)",
}


def geometry_summary(geometry: Mapping[str, Any]) -> dict[str, Any]:
    """The headline numbers of a condition-geometry analysis (no matrices, no per-category rows)."""
    keep = ("vector_cosine", "adapter_cosine", "vector_vs_adapter", "vector_vs_transfer", "adapter_vs_transfer")
    summary: dict[str, Any] = {"categories": len(geometry["categories"])}
    summary.update({k: geometry[k] for k in keep if k in geometry})
    summary["library_reach"] = geometry["library_reach"]["mean"]
    if "retrieval" in geometry:
        summary["retrieval"] = {
            by: {k: v for k, v in cell.items() if k != "per_target"} for by, cell in geometry["retrieval"].items()
        }
    if "families" in geometry:
        summary["families"] = geometry["families"]
    return summary


def _rho(cell: Mapping[str, Any] | None) -> str:
    if not cell or cell.get("spearman") is None:
        return "n/a"
    return f"Spearman {cell['spearman']:+.2f} (Mantel p = {cell['p_value']:.3f}, {cell['pairs']} pairs)"


def geometry_lines(geometry: Mapping[str, Any]) -> list[str]:
    """The report section: does the task vector carry what the adapters differ by?"""
    g = geometry
    lines = [
        "## What the task vectors say about the adapters",
        "",
        f"Over {len(g['categories'])} categories' final LoRAs and task vectors (nothing trained; "
        "`condition_geometry.json`, `condition_geometry.png`). Cosines of weight changes `dW = s B A` are exact, "
        "from the factors.",
        "",
        f"- task-vector cosine between categories: mean {g['vector_cosine']['mean']:.3f} "
        f"(range {g['vector_cosine']['min']:.3f} .. {g['vector_cosine']['max']:.3f})",
        f"- adapter (dW) cosine between categories: mean {g['adapter_cosine']['mean']:.3f} "
        f"(range {g['adapter_cosine']['min']:.3f} .. {g['adapter_cosine']['max']:.3f})",
        f"- task-vector similarity against adapter similarity: {_rho(g['vector_vs_adapter'])}",
        "- the library's reach in weight space, each category left out with all the others as the library: mean "
        "cosine of its adapter to " + ", ".join(f"{REACH[m]} {v:.3f}" for m, v in g["library_reach"]["mean"].items()),
    ]
    if "vector_vs_transfer" in g:
        lines += [
            f"- task-vector similarity against transfer (source LoRA's share of the target's gain): "
            f"{_rho(g['vector_vs_transfer'])}",
            f"- adapter similarity against transfer: {_rho(g['adapter_vs_transfer'])}",
        ]
    for by, cell in g.get("retrieval", {}).items():
        if cell.get("targets"):
            lines.append(
                f"- nearest category by {by.removeprefix('by_').replace('_', ' ')}: its LoRA recovers "
                f"{fmt(cell['mean_nearest_share'], '.1%')} of a target's gain on average, against "
                f"{fmt(cell['mean_best_share'], '.1%')} for the best other category and "
                f"{fmt(cell['mean_median_share'], '.1%')} "
                f"for the median one; it is the best in {fmt(cell['nearest_is_best'], '.1%')} and in the top 3 in "
                f"{fmt(cell['nearest_in_top3'], '.1%')} of {cell['targets']} targets"
            )
    for kind, contrast in g.get("families", {}).items():
        if contrast["within"] is not None and contrast["across"] is not None:
            lines.append(
                f"- {kind.replace('_', ' ')} within a family {contrast['within']:.3f}, across families "
                f"{contrast['across']:.3f}"
            )
    return lines + ["", *_reach_table(g)]


def _reach_table(g: Mapping[str, Any]) -> list[str]:
    """Per category: the library's reach, and with the transfer matrix what its nearest category by task vector
    and its best other category recover of its gain."""
    methods = list(REACH)
    retrieval = g.get("retrieval", {}).get("by_task_vector", {}).get("per_target", {})
    head = "| category | " + " | ".join(f"cos to {m}" for m in methods) + " |"
    rule = "|---|" + "---:|" * len(methods)
    if retrieval:
        head += " nearest by vector | its share of the gain | best other (share) |"
        rule += "---|---:|---|"
    rows = [head, rule]
    for name in g["categories"]:
        cells = [f"{g['library_reach']['per_category'][name][m]:.3f}" for m in methods]
        row = f"| {name} | " + " | ".join(cells) + " |"
        if retrieval:
            t = retrieval.get(name)
            row += (
                f" {t['nearest']} | {fmt(t['nearest_share'], '.1%')} | {t['best']} ({fmt(t['best_share'], '.1%')}) |"
                if t
                else " | | |"
            )
        rows.append(row)
    return rows


def write_geometry(out: str | Path, geometry: Mapping[str, Any], families: Mapping[str, str | None]) -> dict[str, str]:
    """``condition_geometry.json`` (everything, matrices included) and ``condition_geometry.png``: adapter cosine
    against task-vector cosine over category pairs (same family or not), and, with the transfer matrix, the
    source LoRA's share of the target's gain against the task-vector cosine."""
    out = Path(out)
    files = {"geometry": str(write_json(out / "condition_geometry.json", dict(geometry)))}
    names = geometry["categories"]
    vec, ada = geometry["matrices"]["vector_cosine"], geometry["matrices"]["adapter_cosine"]
    pairs = [(i, j) for i in range(len(names)) for j in range(i + 1, len(names))]
    same = [families.get(names[i]) is not None and families.get(names[i]) == families.get(names[j]) for i, j in pairs]
    panels = 2 if "retrieval" in geometry else 1
    plt = pyplot()
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4), squeeze=False)
    ax = axes[0][0]
    for flag, label, colour in ((False, "different families", "tab:gray"), (True, "same family", "tab:red")):
        idx = [k for k, s in enumerate(same) if s == flag]
        ax.scatter([vec[i][j] for i, j in (pairs[k] for k in idx)], [ada[i][j] for i, j in (pairs[k] for k in idx)],
                   s=6, alpha=0.6, label=label, color=colour)  # fmt: skip
    ax.set_xlabel("task-vector cosine")
    ax.set_ylabel("adapter (dW) cosine")
    ax.set_title(_rho(geometry["vector_vs_adapter"]), fontsize=7)
    ax.legend(fontsize=6)
    if panels == 2:
        ax = axes[0][1]
        transfer = geometry["matrices"]["transfer"]
        cells = [(vec[t][s], transfer[t][s]) for t in range(len(names)) for s in range(len(names))]
        xs, ys = [x for x, y in cells if y is not None], [y for _, y in cells if y is not None]
        ax.scatter(xs, ys, s=6, alpha=0.6, color="tab:blue")
        ax.axhline(0.0, color="black", lw=0.6)
        ax.set_xlabel("task-vector cosine (target, source)")
        ax.set_ylabel("source LoRA's share of the target's gain")
        ax.set_title(_rho(geometry.get("vector_vs_transfer")), fontsize=7)
    files["geometry_figure"] = str(save_figure(fig, out / "condition_geometry.png"))
    return files
