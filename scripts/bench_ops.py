"""Benchmark of the operations features on the real SmolLM2 model (a small training budget).

1. Incremental retraining: train N categories, add one to the registry and retrain (``retrain_categories``,
   what the ``icm.category.added`` trigger runs) vs. a full run of all N+1 categories on a fresh root. The
   target: the incremental run costs about one fine-tune plus one generator training (plus evaluating the
   new adapters), far below the full rerun.
2. The fine-tune fan-out (data + LoRA fine-tune of N+1 categories) on a local Dask cluster with 1 vs 2
   worker processes (one torch thread each), each on a fresh root.

    .venv/bin/python scripts/bench_ops.py [--n 3] [--workdir /tmp/icm-bench-ops] [--set lora.steps=10 ...]

Everything runs in this process against one temporary local Prefect server (or PREFECT_API_URL). Prints
each wall time and the stage times recorded in the artifacts.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, unmapped

from flows.pipeline import icm_pipeline
from flows.retrain import retrain_categories, scan_categories
from flows.runtime import make_task_runner
from flows.steps import gather
from icm_core.config import RunConfig, load_run_config
from icm_core.data.categories import builtin_categories
from icm_core.data.documents import source_fingerprint
from tasks.data import prepare_data_task
from tasks.lora import finetune_task


# A budget that keeps every stage real but the whole benchmark to a few minutes on 2 CPU cores.
DEFAULTS = [
    "model.num_threads=1",
    "data.seq_len=64",
    "data.max_chars=60000",
    "lora.steps=12",
    "lora.batch_size=2",
    "lora.last_n_layers=2",
    "lora.trajectory_size=4",
    "lora.checkpoint_every=2",
    "task_vector.num_samples=4",
    "task_vector.sample_tokens=64",
    "cvae.epochs=30",
    "eval.max_tokens=256",
]


def write_registry(folder: Path, names: list[str]) -> Path:
    """A registry folder with one file per built-in category in ``names``."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for category in builtin_categories():
        if category.name in names:
            entry = category.model_dump(include={"name", "description", "source"})
            (folder / f"{category.name}.yaml").write_text(yaml.safe_dump({"categories": [entry]}), encoding="utf-8")
    return folder


def stage_seconds(root: Path, stage: str) -> dict[str, float]:
    """``{category: seconds}`` recorded in the manifests of a per-category stage's outputs (build times)."""
    return {
        manifest.parent.parent.name: json.loads(manifest.read_text())["meta"].get("seconds")
        for manifest in root.glob(f"{stage}/*/*/manifest.json")
    }


def timed(label: str, fn) -> tuple[float, Any]:
    started = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - started
    print(f"{label:<58} {seconds:8.1f} s", flush=True)
    return seconds, result


def executed_stages(state) -> str:
    """Seconds per stage of the task runs that executed (not cache hits) in a flow run and its subflows."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId

    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id]))
        )
        ids = [flow_run_id, *(child.id for child in children)]
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)), limit=200)
    totals: dict[str, list[float]] = {}
    for run in runs:
        stage = (run.task_key or "").rsplit("-", 1)[0].removesuffix("_task")
        if run.state_name == "Completed" and stage and stage != "icm_pipeline":  # not the subflow's own run
            totals.setdefault(stage, []).append(run.total_run_time.total_seconds())
    ranked = sorted(totals.items(), key=lambda kv: -sum(kv[1]))
    return ", ".join(f"{stage} {len(t)}x {sum(t):.1f} s" for stage, t in ranked)


@flow(name="bench-finetune-fanout")
def finetune_fanout(config: RunConfig, names: list[str], root: str) -> None:
    """Data preparation and LoRA fine-tuning of every category: the fan-out a task runner distributes."""
    categories = [c for c in builtin_categories() if c.name in names]
    data = gather(
        prepare_data_task.map(
            categories, [source_fingerprint(c) for c in categories], unmapped(config.data), unmapped(root)
        ),
        names,
        "prepare-data",
    )
    gather(
        finetune_task.map(
            names, data, unmapped(config.model), unmapped(config.data), unmapped(config.lora), unmapped(root)
        ),
        names,
        "finetune-lora",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3, help="existing categories (1-4; built-in demo categories)")
    parser.add_argument("--workdir", default="/tmp/icm-bench-ops", help="scratch folder (emptied first)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    parser.add_argument("--skip-dask", action="store_true")
    args = parser.parse_args()
    names = [c.name for c in builtin_categories()]
    if not 1 <= args.n < len(names):
        parser.error(f"--n must be between 1 and {len(names) - 1}")
    existing, new = names[: args.n], names[args.n]
    config = load_run_config(None, DEFAULTS + args.set)
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    print(f"existing: {', '.join(existing)}; added: {new}; config overrides: {' '.join(DEFAULTS + args.set)}")

    # 1. Incremental retraining vs a full rerun.
    registry, root = work / "registry", work / "incremental"
    write_registry(registry, existing)
    timed(f"initial run, {args.n} categories", lambda: icm_pipeline(config, str(registry), None, str(root)))
    # (the first run also starts the temporary Prefect server when PREFECT_API_URL is not set)
    scan_categories(registry=str(registry), root=str(root), baseline=True)
    write_registry(registry, [*existing, new])
    assert scan_categories(registry=str(registry), root=str(root))["added"] == [new]
    incremental, state = timed(
        f"add '{new}' to {args.n}: incremental retrain",
        lambda: retrain_categories(new, "added", str(registry), str(root), config, return_state=True),
    )
    print(f"  executed: {executed_stages(state)}")
    lora = stage_seconds(root, "lora")
    newest_generator = max(root.glob("generator/*/manifest.json"), key=lambda p: p.stat().st_mtime)
    generator_seconds = json.loads(newest_generator.read_text())["meta"]["seconds"]
    full_root = work / "full"
    full, state = timed(
        f"full rerun, {args.n + 1} categories, fresh root",
        lambda: icm_pipeline(config, str(registry), None, str(full_root), return_state=True),
    )
    print(f"  executed: {executed_stages(state)}")
    full_lora = stage_seconds(full_root, "lora")
    print(f"  in the incremental run: fine-tune of '{new}' {lora[new]:.1f} s, generator {generator_seconds:.1f} s")
    print(f"  fine-tunes in the full rerun: {sum(full_lora.values()):.1f} s for {len(full_lora)} categories")
    print(f"  incremental / full = {incremental / full:.2f}")

    # 2. The fine-tune fan-out on Dask, 1 vs 2 workers.
    if not args.skip_dask:
        everything = [*existing, new]
        for workers in (1, 2):
            runner = make_task_runner("dask", workers=workers)
            fanout_root = work / f"dask-{workers}"
            timed(
                f"fine-tune fan-out, {len(everything)} categories, Dask {workers} worker(s)",
                lambda runner=runner, fanout_root=fanout_root: finetune_fanout.with_options(task_runner=runner)(
                    config, everything, str(fanout_root)
                ),
            )


if __name__ == "__main__":  # Dask's local cluster starts worker processes that import this module
    main()
