"""PNG figures of a run: the task-vector map (the paper's Figure 2), generator training curves, a bar chart
of the main table, and one of the detection results. Written atomically with matplotlib's non-interactive
Agg backend. Bar-chart legends sit outside the axes, so they never hide a bar."""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from icm_core.config import METHOD_TITLES
from icm_core.infra.io import atomic_path
from icm_core.report.tables import methods_in


def pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        # No timestamp in the file: equal inputs give equal PNG bytes.
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    pyplot().close(fig)
    return Path(path)


def pca_2d(vectors: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """Project rows onto their first two principal components; returns (coords [N, 2], explained shares).

    Fewer than three rows have at most one non-trivial component; the missing axis is zero.
    """
    x = vectors.double() - vectors.double().mean(0)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    k = min(2, vh.shape[0])
    coords = torch.zeros(x.shape[0], 2, dtype=torch.float64)
    coords[:, :k] = x @ vh[:k].T
    var = s.pow(2)
    total = float(var.sum()) or 1.0
    shares = [float(v) / total for v in var[:2]] + [0.0] * (2 - k)
    return coords.float(), shares


def plot_task_vectors(vectors: Mapping[str, torch.Tensor], path: str | Path, title: str = "Task vectors") -> Path:
    """2-D PCA map of the task vectors, one labelled point per category."""
    plt = pyplot()
    names = sorted(vectors)
    coords, shares = pca_2d(torch.stack([vectors[n].float().reshape(-1) for n in names]))
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for i, name in enumerate(names):
        ax.scatter(coords[i, 0], coords[i, 1], s=80, color=f"C{i % 10}")
        ax.annotate(name, (coords[i, 0], coords[i, 1]), textcoords="offset points", xytext=(6, 6))
    ax.set_xlabel(f"PC1 ({shares[0]:.0%} of variance)")
    ax.set_ylabel(f"PC2 ({shares[1]:.0%} of variance)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_training_curves(
    cvae_history: Sequence[Mapping[str, Any]],
    pdiff_history: Mapping[str, Sequence[Mapping[str, Any]]] | None,
    path,
    kld_weight: float = 0.005,
) -> Path:
    """ICM-LoRA CVAE reconstruction / weighted KLD per epoch (``kld_weight``: the generator's
    ``CVAEConfig.kld_weight``), and COND P-DIFF's autoencoder and DDPM losses."""
    plt = pyplot()
    panels = 1 + (2 if pdiff_history else 0)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.8), squeeze=False)
    ax = axes[0][0]
    epochs = [row["epoch"] + 1 for row in cvae_history]
    ax.plot(epochs, [row["recon"] for row in cvae_history], label="reconstruction (MSE)")
    ax.plot(epochs, [row["kld"] * kld_weight for row in cvae_history], label=f"{kld_weight:g} x KLD")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_title("ICM-LoRA CVAE")
    checked = [row for row in cvae_history if "val" in row]
    if checked:
        # The early-stopping criterion (cvae.val_criterion: the worst category's unrecovered share of its
        # validation gap, or the mean validation NLL), on its own axis; the dotted line marks the kept epoch.
        val_ax = ax.twinx()
        val_ax.plot(
            [r["epoch"] + 1 for r in checked], [r["val"] for r in checked], "k.-", label="validation criterion"
        )
        best = [r for r in checked if r.get("best")]
        if best:
            val_ax.axvline(best[0]["epoch"] + 1, color="k", ls=":", lw=1)
        handles, labels = ax.get_legend_handles_labels()
        more, more_labels = val_ax.get_legend_handles_labels()
        ax.legend(handles + more, labels + more_labels, fontsize=8)
    else:
        ax.legend()
    if pdiff_history:
        ae, ddpm = pdiff_history.get("autoencoder", []), pdiff_history.get("ddpm", [])
        axes[0][1].plot([r["epoch"] + 1 for r in ae], [r["recon"] for r in ae])
        axes[0][1].set(yscale="log", xlabel="epoch", title="COND P-DIFF autoencoder (MSE)")
        axes[0][2].plot([r["step"] for r in ddpm], [r["loss"] for r in ddpm])
        axes[0][2].set(yscale="log", xlabel="step", title="COND P-DIFF latent DDPM (noise MSE)")
    for a in axes[0]:
        a.grid(alpha=0.3)
    if checked:
        fig.subplots_adjust(wspace=0.75)  # room for the validation axis's ticks between the first two panels
    return save_figure(fig, path)


def plot_main_bars(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Grouped bars: each method's PPL relative to the original model, per category (lower is better)."""
    plt = pyplot()
    methods = methods_in(rows)
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(rows), 4.2))
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        values = [r[f"ppl_{m}"] / r["ppl_base"] if "ppl_base" in r else r[f"ppl_{m}"] for r in rows]
        ax.bar(
            [i + (j - (len(methods) - 1) / 2) * width for i in range(len(rows))], values, width, label=METHOD_TITLES[m]
        )
    ax.set_xticks(range(len(rows)), [r["category"] for r in rows], rotation=20)
    ax.set_ylabel("PPL / PPL of the original model")
    lows = [r[f"ppl_{m}"] / r["ppl_base"] for r in rows for m in methods if "ppl_base" in r]
    if lows:
        ax.set_ylim(min(lows) - 0.02, 1.01)
    outside_legend(ax)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title("Held-out perplexity relative to the original model")
    return save_figure(fig, path)


def outside_legend(ax) -> None:
    """The legend to the right of the axes (bbox_inches="tight" keeps it in the file): it hides no bar."""
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False)


def plot_detection_bars(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Grouped bars of the detection results: mAP50 (left) and mAP75 (right) per task, one bar per method."""
    plt = pyplot()
    methods = [m for m in METHOD_TITLES if any(r["method"] == m for r in rows)]
    tasks = sorted({r["task"] for r in rows})
    by = {(r["method"], r["task"]): r for r in rows}
    fig, axes = plt.subplots(1, 2, figsize=(2.0 + 2.4 * len(tasks), 4.0), sharey=True)
    width = 0.8 / max(1, len(methods))
    for ax, metric, label in ((axes[0], "map50", "mAP50"), (axes[1], "map75", "mAP75")):
        for j, m in enumerate(methods):
            xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(tasks))]
            values = [by[(m, t)][metric] if (m, t) in by else 0.0 for t in tasks]
            ax.bar(xs, values, width, label=METHOD_TITLES[m], color=f"C{j % 10}")
        ax.set_xticks(range(len(tasks)), tasks, rotation=20)
        ax.set_title(f"{label} per task (higher is better)")
        ax.set_ylim(0, 1.0)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("COCO AP")
    outside_legend(axes[1])
    return save_figure(fig, path)


def png_data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def embed_figures(markdown: str, folder: Path) -> str:
    """Replace ``![title](name.png)`` links to files in ``folder`` with data URIs (the UI renders them)."""

    def inline(match: re.Match) -> str:
        figure = folder / match.group(2)
        if "/" in match.group(2) or not figure.is_file():
            return match.group(0)
        return f"![{match.group(1)}]({png_data_url(figure)})"

    return re.sub(r"!\[([^\]]*)\]\(([^)\s]+\.png)\)", inline, markdown)
