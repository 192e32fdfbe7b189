"""Files of a leave-out run: summary.json, per-category CSV, a markdown report and figures (gain per held-out
category and method with intervals; the multi-task LoRA's training curves; the map of all task vectors; what the
task vectors say about the adapters, from :mod:`icm_core.zeroshot.geometry`)."""

from __future__ import annotations

from icm_core.report.category_intervals import category_interval_lines
from icm_core.report.geometry import geometry_lines, geometry_summary, write_geometry
from icm_core.report.tables import fmt


__all__ = ["INTERIM", "TITLES", "interim_dir", "title", "write_leave_out_report", "write_results"]

import json
import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from icm_core.generator.task_vectors import load_task_vector
from icm_core.infra.io import read_json, write_json, write_text
from icm_core.infra.layout import StageOutput
from icm_core.lora.adapters import read_adapter
from icm_core.lora.trajectory import read_trajectory
from icm_core.report.plots import pca_2d, pyplot, save_figure
from icm_core.zeroshot.config import ZeroShotConfig
from icm_core.zeroshot.geometry import condition_geometry, lora_factors
from icm_core.zeroshot.protocol import scaling_size
from icm_core.zeroshot.results import cross_category_matrix, is_interim, summarize


TITLES = {
    "base": "Base model",
    "oracle": "Oracle LoRA (own fine-tune)",
    "mean_lora": "Mean LoRA",
    "multitask_lora": "Multi-task LoRA",
    "nn1": "1-NN LoRA",
    "knn_softmax": "Softmax k-NN LoRA",
    "icm_lora": "ICM-LoRA zero-shot",
    "icm_functional": "ICM-LoRA zero-shot, decoder fine-tuned on the functional loss",
    "selector": "Selector (best candidate on the category's own samples)",
    "icm_shuffled": "ICM-LoRA, shuffled vector (control)",
    "icm_mean_condition": "ICM-LoRA, mean condition (control)",
}


INTERIM = "interim"
"""Subfolder of a results folder for the report over the folds finished so far (removed by the final report)."""


def interim_dir(results_dir: str | Path) -> Path:
    """Where a leave-out run writes its interim reports: ``<results_dir>/interim``."""
    return Path(results_dir) / INTERIM


def title(method: str) -> str:
    """A method's display name (scaling-curve methods: the size of their generator's training set)."""
    size = scaling_size(method)
    if size is not None:
        return f"ICM-LoRA zero-shot, generator trained on {size} categories"
    return TITLES.get(method, method)


def write_results(
    out: str | Path,
    result: Mapping[str, Any],
    folds: Sequence[Sequence[str]],
    mean_nll: Mapping[str, Mapping[str, float]],
    multitask_losses: Mapping[str, Sequence[float]],
    vectors: Mapping[str, torch.Tensor],
    families: Mapping[str, str | None],
    meta: Mapping[str, Any],
    matrix: Mapping[str, Any] | None = None,
    geometry: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Write ``summary.json``, ``results.json``, ``per_category.csv``, ``report.md`` and PNG figures to ``out``
    (with ``matrix``, from :func:`icm_core.zeroshot.protocol`: ``cross_category.csv`` and its
    figure, and its summary in ``summary.json``; with ``geometry``, from
    :func:`icm_core.zeroshot.geometry`: ``condition_geometry.json``, its figure and section).

    A result over only some folds (``summary["complete"]`` false) says so at the top of the report; a complete
    one removes the interim reports under ``out`` (:func:`interim_dir`), which it supersedes."""
    out = Path(out)
    methods = list(result["methods"])
    summary = {**result["summary"], **{k: v for k, v in meta.items() if k not in result["summary"]}}
    if matrix is not None:
        summary["cross_category"] = matrix["summary"]
    if geometry is not None:
        summary["condition_geometry"] = geometry_summary(geometry)
    files = {"summary": str(write_json(out / "summary.json", summary))}
    fold_of = {c: i for i, fold in enumerate(folds) for c in fold}
    payload = {
        "summary": summary,
        "folds": [list(f) for f in folds],
        "per_category": result["per_category"],
        "macro": result["macro"],
        "mean_nll": mean_nll,
        "multitask_losses": multitask_losses,
        "cross_category": matrix,
    }
    files["results"] = str(write_json(out / "results.json", payload))
    rows = ["category,family,fold,method,mean_nll,gap_recovered,ci_low,ci_high"]
    for cat in sorted(mean_nll):
        for m in methods:
            cell = result["per_category"].get(cat, {}).get(m, {})
            rows.append(
                f"{cat},{families.get(cat) or ''},{fold_of.get(cat, '')},{m},{mean_nll[cat].get(m, float('nan')):.6f},"
                f"{cell.get('gap', '')},{cell.get('low', '')},{cell.get('high', '')}"
            )
    files["csv"] = str(write_text(out / "per_category.csv", "\n".join(rows) + "\n"))

    lines = [
        "# Zero-shot adapters for held-out categories (leave-out protocol)",
        "",
        f"{summary['categories']} categories in {summary['folds']} folds; metric: share of the base-to-oracle NLL "
        "gap recovered on each held-out category's test blocks, macro-averaged; 95% paired bootstrap intervals "
        f"over test blocks ({meta.get('bootstrap_samples', '?')} resamples).",
        "",
        *_interim_lines(summary),
        "| method | macro gap recovered | 95% interval |",
        "|---|---:|---|",
    ]
    for m in methods:
        low, high = summary["macro_gain_ci95"][m]
        lines.append(
            f"| {title(m)} (`{m}`) | {fmt(summary['macro_gain'][m], '.1%')} | "
            f"{fmt(low, '.1%')} .. {fmt(high, '.1%')} |"
        )
    lines += ["", "| win rate | share of held-out categories |", "|---|---:|"]
    lines += [f"| `{k}` | {fmt(v, '.1%')} |" for k, v in summary["win_rate"].items()]
    lines += category_interval_lines(summary)
    if summary.get("excluded_categories"):
        lines += [
            "",
            f"Not scored (the oracle did not beat the base model): {', '.join(summary['excluded_categories'])}.",
        ]
    lines += ["", "## Per held-out category", "", "| category | fold | " + " | ".join(methods) + " |"]
    lines.append("|---|---:|" + "---:|" * len(methods))
    for cat in sorted(result["per_category"]):
        cells = [fmt(result["per_category"][cat][m]["gap"], ".1%") for m in methods]
        lines.append(f"| {cat} | {fold_of.get(cat, '')} | " + " | ".join(cells) + " |")
    if summary.get("scaling"):
        lines += ["", *_scaling_lines(summary["scaling"])]
    if matrix is not None:
        files.update(_cross_category(out, matrix, families))
        lines += ["", *_cross_category_lines(matrix, meta)]
    if geometry is not None:
        files.update(write_geometry(out, geometry, families))
        lines += ["", *geometry_lines(geometry)]
    lines += ["", "## Multi-task LoRA training curves", ""]
    for label, losses in multitask_losses.items():
        if losses:
            tail = losses[-max(1, len(losses) // 10) :]
            lines.append(
                f"- {label}: {len(losses)} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f} "
                f"(mean of the last 10%: {sum(tail) / len(tail):.3f})"
            )
    lines += ["", "Run settings:", "", "```json", json.dumps(dict(meta), indent=1, default=str), "```"]
    files["report"] = str(write_text(out / "report.md", "\n".join(lines) + "\n"))
    files.update(_figures(out, result, methods, multitask_losses, vectors, families))
    if not is_interim(summary):
        shutil.rmtree(interim_dir(out), ignore_errors=True)
    return files


def _interim_lines(summary: Mapping[str, Any]) -> list[str]:
    """A notice heading a report over only some folds (none for a complete one)."""
    if not is_interim(summary):
        return []
    return [
        f"**Interim report: {summary['folds_evaluated']} of {summary['folds']} folds scored** "
        f"({summary['categories']} of {summary['protocol_categories']} held-out categories). The remaining "
        "folds, the cross-category matrix and the condition geometry come with the final report, which replaces "
        "this folder.",
        "",
    ]


def _scaling_lines(points: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = [
        "## Scaling: zero-shot gain against the number of training categories",
        "",
        "Per fold, generators trained on nested subsets of the fold's training categories, each scored on the "
        "fold's held-out categories; the last row is the protocol's own generator (all training categories).",
        "",
        "| training categories | method | macro gap recovered | 95% interval |",
        "|---:|---|---:|---|",
    ]
    for point in points:
        low, high = point["ci95"]
        size = point["training_categories"]
        shown = f"{size:g}" if "per_fold" not in point else f"{size:g} (per fold {point['per_fold']})"
        lines.append(
            f"| {shown} | `{point['method']}` | {fmt(point['macro_gain'], '.1%')} | "
            f"{fmt(low, '.1%')} .. {fmt(high, '.1%')} |"
        )
    return lines


def _cross_category_lines(matrix: Mapping[str, Any], meta: Mapping[str, Any]) -> list[str]:
    info = matrix["summary"]
    tokens = meta.get("config", {}).get("zeroshot", {}).get("cross_matrix_tokens", "?")
    beaten = info["targets_beaten_by_another_lora"]
    return [
        "## Are the categories distinct? The cross-category matrix",
        "",
        f"Every category's own LoRA scored on every category's test text ({tokens} tokens each), as the share of "
        "the target's own base-to-LoRA NLL gap it recovers (1 on the diagonal): `cross_category.csv`, "
        "`cross_category_matrix.png`.",
        "",
        f"- off-diagonal share: mean {fmt(info['mean_off_diagonal'], '.1%')}, "
        f"largest {fmt(info['max_off_diagonal'], '.1%')}",
        f"- targets where another category's LoRA beats the own one: {len(beaten)} of {info['scored_targets']}"
        + (": " + ", ".join(f"{t} (by {s})" for t, s in sorted(beaten.items())) if beaten else ""),
    ]


def _cross_category(out: Path, matrix: Mapping[str, Any], families: Mapping[str, str | None]) -> dict[str, str]:
    """``cross_category.csv`` (target, source, share) and the matrix as a heat map, categories grouped by family."""
    names = sorted(matrix["categories"], key=lambda n: (str(families.get(n)), n))
    share = matrix["share"]
    rows = ["target,source,gap_recovered"]
    rows += [f"{t},{s},{'' if share[t][s] is None else f'{share[t][s]:.6f}'}" for t in names for s in names]
    files = {"cross_csv": str(write_text(out / "cross_category.csv", "\n".join(rows) + "\n"))}
    plt = pyplot()
    grid = [[math.nan if share[t][s] is None else share[t][s] for s in names] for t in names]
    size = max(4.0, 0.16 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(grid, cmap="RdBu", vmin=-1, vmax=1)
    ticks = range(len(names))
    fontsize = 7 if len(names) <= 16 else 5
    ax.set_xticks(ticks, names, rotation=90, fontsize=fontsize)
    ax.set_yticks(ticks, names, fontsize=fontsize)
    ax.set_xlabel("LoRA of category (source)")
    ax.set_ylabel("test text of category (target)")
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the target's own LoRA gain (clipped to [-1, 1])")
    files["cross_figure"] = str(save_figure(fig, out / "cross_category_matrix.png"))
    return files


def _figures(out, result, methods, multitask_losses, vectors, families) -> dict[str, str]:
    plt = pyplot()
    files = {}
    cats = sorted(result["per_category"])
    shown = [m for m in methods if m not in ("base", "oracle") and scaling_size(m) is None]
    if cats and shown:
        fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(cats) * len(shown) / 3), 4))
        width = 0.8 / len(shown)
        for j, m in enumerate(shown):
            xs = [i + (j - (len(shown) - 1) / 2) * width for i in range(len(cats))]
            cells = [result["per_category"][c][m] for c in cats]
            ys = [c["gap"] for c in cells]
            err = [[max(0, c["gap"] - c["low"]) for c in cells], [max(0, c["high"] - c["gap"]) for c in cells]]
            ax.bar(xs, ys, width, yerr=err, label=m, capsize=1)
        ax.axhline(1.0, color="black", lw=0.6, ls="--")
        ax.axhline(0.0, color="black", lw=0.6)
        ax.set_xticks(range(len(cats)), cats, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("share of base-to-oracle NLL gap")
        ax.legend(fontsize=6, ncol=2)
        files["gain_figure"] = str(save_figure(fig, out / "gain_per_category.png"))
    scaling = result["summary"].get("scaling")
    if scaling:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        xs = [p["training_categories"] for p in scaling]
        ys = [p["macro_gain"] for p in scaling]
        err = [[max(0, p["macro_gain"] - p["ci95"][0]) for p in scaling],
               [max(0, p["ci95"][1] - p["macro_gain"]) for p in scaling]]  # fmt: skip
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label="ICM-LoRA zero-shot")
        for baseline, style in (("mean_lora", "--"), ("knn_softmax", ":"), ("multitask_lora", "-.")):
            if baseline in result["macro"]:
                ax.axhline(result["macro"][baseline]["gap"], ls=style, lw=0.8, color="gray", label=baseline)
        ax.set_xlabel("training categories of the generator")
        ax.set_ylabel("macro share of the gap recovered")
        ax.legend(fontsize=6)
        files["scaling_curve"] = str(save_figure(fig, out / "scaling_curve.png"))
    if multitask_losses:
        fig, ax = plt.subplots(figsize=(5, 3))
        for label, losses in multitask_losses.items():
            ax.plot(range(1, len(losses) + 1), losses, label=label, lw=0.8)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend(fontsize=6)
        files["multitask_curve"] = str(save_figure(fig, out / "multitask_training_curve.png"))
    if len(vectors) >= 2:
        names = sorted(vectors)
        coords, shares = pca_2d(torch.stack([vectors[n].float() for n in names]))
        fig, ax = plt.subplots(figsize=(6, 5))
        fams = sorted({str(families.get(n)) for n in names})
        for fam in fams:
            idx = [i for i, n in enumerate(names) if str(families.get(n)) == fam]
            ax.scatter(coords[idx, 0], coords[idx, 1], label=fam, s=14)
        for i, n in enumerate(names):
            ax.annotate(n, (float(coords[i, 0]), float(coords[i, 1])), fontsize=5)
        ax.set_xlabel(f"PC1 ({100 * shares[0]:.0f}%)")
        ax.set_ylabel(f"PC2 ({100 * shares[1]:.0f}%)" if len(shares) > 1 else "PC2")
        ax.legend(fontsize=6)
        files["vector_map"] = str(save_figure(fig, out / "task_vector_map.png"))
    return files


def write_leave_out_report(
    results_dir: str | Path,
    evals: Mapping[str, Mapping[str, StageOutput]],
    folds: Sequence[Sequence[str]],
    multitask: Mapping[str, StageOutput],
    vectors: Mapping[str, StageOutput],
    families: Mapping[str, str | None],
    meta: Mapping[str, Any],
    samples: int,
    seed: int,
    cross: Mapping[str, Any] | None = None,
    loras: Mapping[str, StageOutput] | None = None,
) -> dict[str, Any]:
    """Read every evaluation's per-block NLL, compute the metric and write the results folder.

    Args:
        results_dir: Where summary.json, report.md, per_category.csv and the figures go.
        evals: ``{category: {method: evaluation}}`` of the held-out categories (``metrics.json`` per block).
        folds: The fold assignment.
        multitask: Each fold's multi-task LoRA (its training curve is plotted).
        vectors: Every category's task vector.
        families: Each category's family.
        meta: Run settings recorded in summary.json.
        samples: Bootstrap resamples.
        seed: Seed of the bootstrap.
        cross: The cross-category matrix's evaluations (``{"lora": {target: {source: eval}}, "base": {target:
            eval}}``), see ``flows.zeroshot.cross_category_evals``.
        loras: Every category's own LoRA: with three or more, what the task vectors say about the adapters
            (:mod:`icm_core.zeroshot.geometry`).

    Returns:
        ``{"result"`` (:func:`~icm_core.zeroshot.results.summarize`), ``"matrix"``, ``"geometry"``, ``"files"}``.
    """

    def block_nll(evaluation: StageOutput) -> list[float]:  # nats per token of each scored test block
        metrics = read_json(evaluation.file("metrics.json"))
        return [total / tokens for total, tokens in zip(metrics["block_nll"], metrics["block_tokens"], strict=True)]

    def mean_nll_of(evaluation: StageOutput) -> float:
        values = block_nll(evaluation)
        return sum(values) / len(values)

    nll = {cat: {m: block_nll(ev) for m, ev in by.items()} for cat, by in evals.items()}
    matrix = None
    if cross is not None:
        matrix = cross_category_matrix(
            {t: {s: mean_nll_of(ev) for s, ev in by.items()} for t, by in cross["lora"].items()},
            {t: mean_nll_of(ev) for t, ev in cross["base"].items()},
        )
    result = summarize(nll, folds, samples=samples, seed=seed, families=families, picks=meta.get("selector_picks"))
    mean_nll = {cat: {m: sum(v) / len(v) for m, v in by.items()} for cat, by in nll.items()}
    losses = {label: read_trajectory(output.folder).losses for label, output in multitask.items()}
    tensors = {name: load_task_vector(output.file("task_vector.safetensors")) for name, output in vectors.items()}
    geometry = None
    if loras and len(loras) >= 3:
        adapters = {n: lora_factors(*read_adapter(read_trajectory(o.folder).adapter_dir)) for n, o in loras.items()}
        zs = ZeroShotConfig(**meta.get("config", {}).get("zeroshot", {}))  # the k-NN baselines' settings
        geometry = condition_geometry(
            tensors, adapters, matrix and matrix["share"], families, seed=seed, knn_k=zs.knn_k,
            knn_temperature=zs.knn_temperature,
        )  # fmt: skip
    files = write_results(
        results_dir, result, folds, mean_nll, losses, tensors, families, {**meta, "bootstrap_samples": samples},
        matrix, geometry,
    )  # fmt: skip
    return {"result": result, "matrix": matrix, "geometry": geometry, "files": files}
