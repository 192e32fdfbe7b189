"""Prefect task that turns a leave-out run's per-block NLL files into results (files and UI artifacts).

A presentation module: it only formats results, so editing it re-renders the report without retraining.
"""

from __future__ import annotations

import math
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from icm_core.generator.task_vectors import load_task_vector
from icm_core.infra.io import read_json
from icm_core.lora.adapters import read_adapter
from icm_core.lora.trajectory import read_trajectory
from icm_core.report.zeroshot import geometry_lines, write_results
from icm_core.zeroshot.config import ZeroShotConfig
from icm_core.zeroshot.geometry import condition_geometry, lora_factors
from icm_core.zeroshot.results import cross_category_matrix, is_interim, summarize
from tasks.artifacts import ArtifactRef, localize


@task(name="zeroshot-report", task_run_name="zeroshot-report", persist_result=False)
def report_task(
    nll_refs: dict[str, dict[str, ArtifactRef]],
    folds: list[list[str]],
    multitask: dict[str, ArtifactRef],
    vectors: dict[str, ArtifactRef],
    families: dict[str, str | None],
    meta: dict[str, Any],
    samples: int,
    seed: int,
    root: str,
    results_dir: str,
    cross: dict[str, Any] | None = None,
    loras: dict[str, ArtifactRef] | None = None,
) -> dict[str, Any]:
    """Read every evaluation's per-block NLL, compute the metric and write the results folder (with the cross-category
    matrix when ``cross`` holds its evaluations, see ``flows.zeroshot.cross_category_evals``; with every
    category's own LoRA in ``loras``: what the task vectors say about the adapters, icm_core.zeroshot.geometry)."""

    def block_nll(ref: ArtifactRef) -> list[float]:  # nats per token of each scored test block
        metrics = read_json(localize(ref, root).file("metrics.json"))
        return [total / tokens for total, tokens in zip(metrics["block_nll"], metrics["block_tokens"], strict=True)]

    def mean_nll_of(ref: ArtifactRef) -> float:
        values = block_nll(ref)
        return sum(values) / len(values)

    nll = {cat: {m: block_nll(ref) for m, ref in refs.items()} for cat, refs in nll_refs.items()}
    matrix = None
    if cross is not None:
        matrix = cross_category_matrix(
            {t: {s: mean_nll_of(ref) for s, ref in by.items()} for t, by in cross["lora"].items()},
            {t: mean_nll_of(ref) for t, ref in cross["base"].items()},
        )
    result = summarize(nll, folds, samples=samples, seed=seed)
    mean_nll = {cat: {m: sum(v) / len(v) for m, v in by.items()} for cat, by in nll.items()}
    losses = {label: read_trajectory(localize(ref, root).folder).losses for label, ref in multitask.items()}
    tensors = {
        name: load_task_vector(localize(ref, root).file("task_vector.safetensors")) for name, ref in vectors.items()
    }
    geometry = None
    if loras and len(loras) >= 3:
        adapters = {n: lora_factors(*read_adapter(read_trajectory(localize(r, root).folder).adapter_dir))
                    for n, r in loras.items()}  # fmt: skip
        zs = ZeroShotConfig(**meta.get("config", {}).get("zeroshot", {}))  # the k-NN baselines' settings
        geometry = condition_geometry(
            tensors, adapters, matrix and matrix["share"], families, seed=seed, knn_k=zs.knn_k,
            knn_temperature=zs.knn_temperature,
        )  # fmt: skip
    files = write_results(
        results_dir, result, folds, mean_nll, losses, tensors, families, {**meta, "bootstrap_samples": samples},
        matrix, geometry,
    )  # fmt: skip
    _publish(result, matrix)
    if geometry is not None:
        create_markdown_artifact(
            "\n".join(geometry_lines(geometry)),
            key="icm-zeroshot-condition-geometry",
            description="Zero-shot: does the task vector carry what the categories' adapters differ by?",
        )
    return {"summary": result["summary"], "files": files, "cross_category": matrix and matrix["summary"]}


def _rounded(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, 4)


def _publish(result: dict[str, Any], matrix: dict[str, Any] | None = None) -> None:
    """Prefect UI artifacts: the macro table, one row per held-out category and method, the win rates, and the
    cross-category matrix (one row per target category). An interim result's descriptions say how many folds
    it covers; the final report publishes new versions of the same keys."""
    summary = result["summary"]
    coverage = f" (interim: {summary['folds_evaluated']} of {summary['folds']} folds)" if is_interim(summary) else ""
    macro = [
        {
            "method": m,
            "macro_gap_recovered": _rounded(summary["macro_gain"][m]),
            "ci95_low": _rounded(summary["macro_gain_ci95"][m][0]),
            "ci95_high": _rounded(summary["macro_gain_ci95"][m][1]),
        }
        for m in result["methods"]
    ]
    create_table_artifact(
        macro, key="icm-zeroshot-macro", description="Zero-shot: macro share of the gap recovered" + coverage
    )
    rows = [
        {"category": cat, "method": m, "gap_recovered": _rounded(cell["gap"]), "ci95_low": _rounded(cell["low"]),
         "ci95_high": _rounded(cell["high"])}
        for cat, by in sorted(result["per_category"].items())
        for m, cell in by.items()
    ]  # fmt: skip
    create_table_artifact(
        rows, key="icm-zeroshot-per-category", description="Zero-shot: gap recovered per category" + coverage
    )
    create_table_artifact(
        [{"comparison": k, "win_rate": _rounded(v)} for k, v in summary["win_rate"].items()],
        key="icm-zeroshot-win-rates",
        description="Share of held-out categories where the zero-shot generator beats each baseline / control"
        + coverage,
    )
    if summary.get("scaling"):
        create_table_artifact(
            [
                {"training_categories": p["training_categories"], "method": p["method"],
                 "macro_gap_recovered": _rounded(p["macro_gain"]), "ci95_low": _rounded(p["ci95"][0]),
                 "ci95_high": _rounded(p["ci95"][1])}
                for p in summary["scaling"]
            ],
            key="icm-zeroshot-scaling",
            description="Zero-shot macro gain against the number of categories the generator trained on" + coverage,
        )  # fmt: skip
    if matrix is not None:
        create_table_artifact(
            [{"target": t, **{s: _rounded(v) for s, v in matrix["share"][t].items()}} for t in matrix["categories"]],
            key="icm-zeroshot-cross-category",
            description="Share of each target category's own LoRA gain recovered by every category's LoRA",
        )
