"""The detection report stage (a presentation module: editing it re-renders reports, never retrains).

mAP50 / mAP75 per task and method (paper Table 1), and for every method a paired bootstrap 95% interval over
test images of its mAP difference to the original LoRA and to the base detector, computed from the detections
each evaluation stored (``detections.json``) and the task's test annotations.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from icm_core.infra.io import csv_text, write_json, write_text
from icm_core.report.detection import add_detection_intervals, markdown_report, result_rows
from icm_core.report.plots import plot_detection_bars
from tasks.artifacts import ArtifactCachePolicy, ArtifactRef, localize
from tasks.stage import TASK_DEFAULTS, run_stage


FIGURE = "detection_results.png"


@task(
    name="detection-report",
    task_run_name="det-report",
    cache_policy=ArtifactCachePolicy("report", category_arg=None),
    **TASK_DEFAULTS,
)
def detection_report_task(
    evals: dict[str, dict[str, ArtifactRef]],
    loras: dict[str, ArtifactRef],
    generator: ArtifactRef,
    run_info: dict[str, Any],
    root: str,
    data: dict[str, ArtifactRef] | None = None,
) -> ArtifactRef:
    """Write report.md / results.csv / results.json: mAP50 and mAP75 per task and method (paper Table 1), with
    bootstrap intervals over test images when the tasks' data (``data``) is given."""
    inputs = {"evals": evals, "loras": loras, "generator": generator, "run_info": run_info, "root": root}
    if data is not None:
        inputs["data"] = data

    def build(out: Path) -> dict[str, Any]:
        scores = {task: {method: ref.meta for method, ref in by.items()} for task, by in evals.items()}
        training = {task: ref.meta for task, ref in loras.items()}
        rows = result_rows(scores)
        if data is not None:
            folders = {
                task: {method: localize(ref, root).folder for method, ref in by.items()} for task, by in evals.items()
            }
            tasks_dirs = {task: localize(ref, root).file("task") for task, ref in data.items()}
            add_detection_intervals(rows, folders, tasks_dirs)
        write_json(
            out / "results.json", {"rows": rows, "training": training, "generator": generator.meta, "run": run_info}
        )
        write_text(out / "results.csv", csv_text(rows))
        plot_detection_bars(rows, out / FIGURE)
        figure = f"\n## Figure\n\n![mAP50 and mAP75 per task and method]({FIGURE})\n"
        write_text(out / "report.md", markdown_report(rows, training, generator.meta, run_info) + figure)
        return {"rows": rows}

    return run_stage("report", None, inputs, build)
