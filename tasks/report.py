"""The report stages of every flow, and the same results as Prefect UI artifacts.

The reports themselves (tables, markdown, figures) are written by ``icm_core.report``; these tasks localise their
inputs (on an fsspec root they may have been built on other machines), key the report folder by them and publish
the results to the UI. A presentation module: editing it re-renders reports and retrains nothing.

UI artifacts of the pipeline's report: a table artifact, the markdown report with its figures embedded (data URIs:
the UI cannot fetch files from the worker), image artifacts for the figures, and one markdown artifact that says
where the generated adapters and generators are and how to load them (as paths: a ``file://`` link from the UI
does not open in a browser).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_image_artifact, create_markdown_artifact, create_table_artifact

from icm_core.report.ablations import write_ablation_report
from icm_core.report.detection import write_detection_report
from icm_core.report.geometry import geometry_lines
from icm_core.report.pipeline import FIGURES, outputs_markdown, write_report
from icm_core.report.plots import embed_figures, png_data_url
from icm_core.report.zeroshot import write_leave_out_report
from icm_core.zeroshot.results import is_interim
from tasks.artifacts import ArtifactRef, localize
from tasks.stage import Build, stage_task
from tasks.store import is_remote, local_root


def _localized(refs: Any, root: str) -> Any:
    """``refs`` (a ref, or a dict / list of them, nested) as this machine holds them."""
    if isinstance(refs, ArtifactRef):
        return localize(refs, root)
    if isinstance(refs, dict):
        return {k: _localized(v, root) for k, v in refs.items()}
    if isinstance(refs, list):
        return [_localized(v, root) for v in refs]
    return refs


# --------------------------------------------------------------------------------------------------
# The pipeline (seen categories)
# --------------------------------------------------------------------------------------------------


@stage_task("report", category_arg=None, name="report", task_run_name="report")
def report_task(
    evals: list[dict[str, dict[str, ArtifactRef]]],
    adapters: dict[str, ArtifactRef],
    generator: ArtifactRef,
    root: str,
    data: dict[str, ArtifactRef] | None = None,
    loras: dict[str, ArtifactRef] | None = None,
    task_vectors: dict[str, ArtifactRef] | None = None,
    pdiff: ArtifactRef | None = None,
    soups: dict[str, ArtifactRef] | None = None,
    diagnostics: list[dict[str, ArtifactRef]] | None = None,
    z_evals: list[dict[str, list[ArtifactRef]]] | None = None,
    pdiff_shared: ArtifactRef | None = None,
) -> Build:
    """The pipeline's report (``icm_core.report.pipeline.write_report``) for all categories and seeds."""

    def build(out: Path) -> dict[str, Any]:
        inputs = _localized(
            [adapters, generator, data, loras, task_vectors, pdiff, soups, diagnostics, z_evals, pdiff_shared], root
        )
        written = write_report(out, evals, inputs[0], inputs[1], local_root(root), *inputs[2:])
        return {**written, "root": root}

    return build


def publish_report(report: ArtifactRef, generator: ArtifactRef, pdiff: ArtifactRef | None = None) -> None:
    """Show the results in the Prefect UI: tables, the markdown report with its figures, and the outputs."""
    rows = report.meta["rows"]
    root = report.meta.get("root") or str(Path(report.folder).parents[1])  # <root>/report/<key>
    create_table_artifact(
        key="icm-eval-summary",
        table=[{k: v for k, v in row.items() if k != "adapter_dir"} for row in rows],
        description="PPL / BPC per category for the original model, the original LoRA, the baselines and ICM-LoRA, "
        "and the share of the fine-tuning gain each generated adapter recovers.",
    )
    if report.meta.get("storage"):
        create_table_artifact(
            key="icm-storage", table=report.meta["storage"], description="Bytes stored per method (paper Table 3)."
        )
    create_markdown_artifact(
        key="icm-report",
        markdown=embed_figures(report.file("report.md").read_text(), report.folder),
        description="ICM-LoRA report (figures embedded)",
    )
    for name, title in FIGURES.items():
        figure = report.file(name)
        if figure.is_file():
            key = "icm-figure-" + name.removesuffix(".png").replace("_", "-")
            create_image_artifact(image_url=png_data_url(figure), key=key, description=title)
    create_markdown_artifact(
        key="icm-outputs",
        markdown=outputs_markdown(rows, generator, pdiff, local_root(root), root if is_remote(root) else None),
        description="Generated adapters and generators: where they are, how to load them",
    )


# --------------------------------------------------------------------------------------------------
# The ablations (paper Tables 4-6)
# --------------------------------------------------------------------------------------------------


@stage_task("ablation_report", category_arg=None, name="ablation-report", task_run_name="ablation-report")
def ablation_report_task(variants: list[dict[str, Any]], root: str) -> Build:
    """Write ablations.md / ablations.json / ablations.csv and the gain-vs-rank figure."""
    return lambda out: write_ablation_report(out, variants)


def publish_ablations(report: ArtifactRef) -> None:
    """The ablation tables and figure in the Prefect UI."""
    create_table_artifact(
        key="icm-ablations-summary", table=report.meta["summary"], description="One row per ablation variant."
    )
    create_markdown_artifact(
        key="icm-ablations", markdown=report.file("ablations.md").read_text(), description="ICM-LoRA ablations"
    )
    figure = report.file("gain_vs_rank.png")
    if figure.is_file():
        create_image_artifact(
            image_url=png_data_url(figure), key="icm-figure-gain-vs-rank", description="Gain vs rank"
        )


# --------------------------------------------------------------------------------------------------
# Detection (paper Table 1)
# --------------------------------------------------------------------------------------------------


@stage_task("report", category_arg=None, name="detection-report", task_run_name="det-report")
def detection_report_task(
    evals: dict[str, dict[str, ArtifactRef]],
    loras: dict[str, ArtifactRef],
    generator: ArtifactRef,
    run_info: dict[str, Any],
    root: str,
    data: dict[str, ArtifactRef] | None = None,
) -> Build:
    """mAP50 / mAP75 per task and method, with bootstrap intervals over test images when the tasks' data
    (``data``) is given (``icm_core.report.detection.write_detection_report``)."""

    def build(out: Path) -> dict[str, Any]:
        scores = {name: {method: ref.meta for method, ref in by.items()} for name, by in evals.items()}
        training = {name: ref.meta for name, ref in loras.items()}
        folders = task_dirs = None
        if data is not None:
            folders = {name: {m: localize(ref, root).folder for m, ref in by.items()} for name, by in evals.items()}
            task_dirs = {name: localize(ref, root).file("task") for name, ref in data.items()}
        return write_detection_report(out, scores, training, generator.meta, run_info, folders, task_dirs)

    return build


# --------------------------------------------------------------------------------------------------
# The leave-out protocol (categories the generator never saw)
# --------------------------------------------------------------------------------------------------


@task(name="zeroshot-report", task_run_name="zeroshot-report", persist_result=False)
def zeroshot_report_task(
    evals: dict[str, dict[str, ArtifactRef]],
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
    """Write the leave-out results folder (``icm_core.report.zeroshot.write_leave_out_report``; not cached: it
    writes ``results_dir``, outside the artifacts root) and publish it to the UI."""
    written = write_leave_out_report(
        results_dir, _localized(evals, root), folds, _localized(multitask, root), _localized(vectors, root),
        families, meta, samples, seed, _localized(cross, root), _localized(loras, root),
    )  # fmt: skip
    result, matrix, geometry = written["result"], written["matrix"], written["geometry"]
    _publish_zeroshot(result, matrix)
    if geometry is not None:
        create_markdown_artifact(
            "\n".join(geometry_lines(geometry)),
            key="icm-zeroshot-condition-geometry",
            description="Zero-shot: does the task vector carry what the categories' adapters differ by?",
        )
    return {"summary": result["summary"], "files": written["files"], "cross_category": matrix and matrix["summary"]}


def _rounded(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, 4)


def _publish_zeroshot(result: dict[str, Any], matrix: dict[str, Any] | None = None) -> None:
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
