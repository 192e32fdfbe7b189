"""Prefect task that turns a leave-out run's per-block NLL files into results (files and UI artifacts).

A presentation module: it only formats results, so editing it re-renders the report without retraining.
"""

from __future__ import annotations

from typing import Any

from prefect import task

from icm_core.io import read_json
from icm_core.lora_train import read_trajectory
from icm_core.stages import load_task_vector
from icm_core.zeroshot import summarize
from icm_core.zeroshot_report import write_results
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
) -> dict[str, Any]:
    """Read every per-block NLL file, compute the metric and write the results folder."""
    nll = {
        cat: {m: read_json(localize(ref, root).file("nll.json"))["nll"] for m, ref in refs.items()}
        for cat, refs in nll_refs.items()
    }
    result = summarize(nll, folds, samples=samples, seed=seed)
    mean_nll = {cat: {m: sum(v) / len(v) for m, v in by.items()} for cat, by in nll.items()}
    losses = {label: read_trajectory(localize(ref, root).folder).losses for label, ref in multitask.items()}
    tensors = {
        name: load_task_vector(localize(ref, root).file("task_vector.safetensors")) for name, ref in vectors.items()
    }
    files = write_results(
        results_dir, result, folds, mean_nll, losses, tensors, families, {**meta, "bootstrap_samples": samples}
    )
    return {"summary": result["summary"], "files": files}
