"""The ICM-LoRA pipeline flow: every category fanned out, one generator, then sampling and evaluation.

    data -> LoRA fine-tune -> task vector      (per category, .map)
         -> one CVAE for all categories            -> sample ICM-LoRA adapter   (per category)
         -> baselines: Model Soup (weight-delta average), COND P-DIFF (AE + latent DDPM) -> their adapters
         -> evaluate base / LoRA / Model Soup / COND P-DIFF / ICM-LoRA   (per category, .map)
         -> report (tables, storage, figures; files + Prefect table, markdown, image and link artifacts)

Every task is cached by its inputs' content (see ``tasks/artifacts.py``), so a second run is all cache
hits, a killed run resumes where it stopped (inside the long stages too: ``RunConfig.resume``), and
changing one stage's config reruns that stage and what follows it. Prefect's result records are kept
inside the artifacts root (``tasks/records.py``). Run it with ``python -m flows.pipeline`` (see
``--help``) or as a deployment.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Collection, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, unmapped
from prefect.futures import PrefectFuture, wait

from flows.runtime import RUNNERS, device_from_env, make_task_runner
from icm_core.config import METHOD_NAMES, RunConfig, load_run_config
from icm_core.data import Category, builtin_categories, source_fingerprint
from icm_core.registry import load_registry
from icm_core.runner import format_table
from tasks.artifacts import ArtifactRef
from tasks.manifest import VERIFY_ENV
from tasks.records import on_root
from tasks.report import publish_report, report_task
from tasks.stages import (
    evaluate_task,
    finetune_task,
    prepare_data_task,
    sample_adapter_task,
    sample_pdiff_task,
    soup_task,
    task_vector_task,
    train_generator_task,
    train_pdiff_task,
)
from tasks.store import normalize_root, write_root_json


class CategoryFailed(RuntimeError):
    """One or more categories failed a stage; the message names them."""


def gather(futures: Sequence[PrefectFuture], labels: Sequence[str], stage: str) -> list[Any]:
    """Wait for fanned-out task runs and return their results, or fail naming every failed category."""
    wait(list(futures))
    failures = []
    for future, label in zip(futures, labels, strict=True):
        state = future.state
        if not state.is_completed():
            failures.append(f"{label}: {state.name}: {state.message or ''}".strip())
    if failures:
        raise CategoryFailed(f"stage {stage} failed for " + "; ".join(failures))
    return [future.result() for future in futures]


@dataclass
class Baselines:
    """The baseline methods' outputs: each method's adapter per category (in ``names`` order), the Model
    Soup adapters by label (``all``, or one per category for ``soup.scope=trajectory``) and the trained
    COND P-DIFF model (None when it was not asked for)."""

    adapters: dict[str, list[ArtifactRef]] = field(default_factory=dict)
    soups: dict[str, ArtifactRef] = field(default_factory=dict)
    pdiff: ArtifactRef | None = None


def baseline_adapters(
    methods: Collection[str],
    names: list[str],
    lora_by_name: dict[str, ArtifactRef],
    vector_by_name: dict[str, ArtifactRef],
    cfg: Any,
    device: str,
    root: str,
) -> Baselines:
    """Model Soup and COND P-DIFF adapters for the methods asked for, from the same trajectories and task
    vectors as the generator (``cfg`` has ``soup``, ``pdiff`` and ``sample`` sections). Shared by the
    language and the detection pipelines."""
    out = Baselines()
    soup = on_root(soup_task, root)
    if "model_soup" in methods:
        if cfg.soup.scope == "all_categories":
            out.soups = {"all": soup("all", lora_by_name, cfg.soup, root)}
            out.adapters["model_soup"] = [out.soups["all"]] * len(names)
        else:
            refs = gather(
                soup.map(names, [{n: lora_by_name[n]} for n in names], unmapped(cfg.soup), unmapped(root)),
                names,
                "model-soup",
            )
            out.soups = dict(zip(names, refs, strict=True))
            out.adapters["model_soup"] = refs
    if "cond_pdiff" in methods:
        out.pdiff = on_root(train_pdiff_task, root)(lora_by_name, vector_by_name, cfg.pdiff, device, root, cfg.resume)
        out.adapters["cond_pdiff"] = gather(
            on_root(sample_pdiff_task, root).map(names, unmapped(out.pdiff), unmapped(cfg.sample), unmapped(root)),
            names,
            "sample-pdiff",
        )
    return out


def select_categories(categories_file: str | None, only: Sequence[str] | None) -> list[Category]:
    categories = load_registry(categories_file) if categories_file else builtin_categories()
    names = [c.name for c in categories]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"duplicate category names: {duplicates}")
    if only:
        unknown = sorted(set(only) - set(names))
        if unknown:
            raise ValueError(f"only: unknown categories {unknown}; known: {sorted(names)}")
        categories = [c for c in categories if c.name in set(only)]
    if not categories:
        raise ValueError("no categories to run")
    return categories


def _run_name() -> str:
    from prefect.runtime import flow_run

    params = flow_run.parameters
    only = params.get("only")
    return f"icm-pipeline-{'-'.join(only) if only else 'all'}"


@contextmanager
def verification(full: bool):
    """Full (sha256) verification of every reused output for the duration of a run (``ICM_VERIFY=full``);
    otherwise whatever the environment says (quick, stat-only, by default)."""
    if not full:
        yield
        return
    before = os.environ.get(VERIFY_ENV)
    os.environ[VERIFY_ENV] = "full"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(VERIFY_ENV, None)
        else:
            os.environ[VERIFY_ENV] = before


@flow(name="icm-pipeline", flow_run_name=_run_name, log_prints=True)
def icm_pipeline(
    config: RunConfig = RunConfig(),  # noqa: B008 - pydantic default, shown as a form in the UI
    categories_file: str | None = None,
    only: list[str] | None = None,
    root: str = "artifacts",
    publish: bool = True,
    verify: bool = False,
    pointer: str = "latest.json",
) -> dict[str, Any]:
    """Fine-tune every category, train one ICM-LoRA generator, generate and evaluate an adapter per category.

    Args:
        config: All stage configs (model, data, lora, task_vector, cvae, sample, eval); defaults are the CPU demo.
        categories_file: YAML/JSON file with a ``categories:`` list, or a folder of such files (a category
            registry); default: the five built-in demo categories.
        only: Run just these category names.
        root: Artifacts root: a local folder, or an fsspec URL (``s3://...``, ``file:///shared/...``) that
            workers on several machines share.
        publish: Publish the results as Prefect UI artifacts (tables, report, figures, links).
        verify: Re-hash every reused output and model file instead of checking sizes and mtimes (slow: reads
            every byte; catches a file changed in place with its size and mtime restored).
        pointer: File at the top of the root that records this run's results (``generate_adapter`` reads
            ``latest.json``); ablation variants write their own so they never move ``latest.json``.
    """
    with verification(verify):
        return _pipeline(config, categories_file, only, root, publish, pointer)


def _pipeline(
    config: RunConfig, categories_file: str | None, only: list[str] | None, root: str, publish: bool, pointer: str
) -> dict[str, Any]:
    logger = get_run_logger()
    if not pointer.endswith(".json") or Path(pointer).is_absolute() or ".." in Path(pointer).parts:
        raise ValueError(f"pointer: {pointer!r} must be a relative .json path inside the root")
    categories = select_categories(categories_file, only)
    names = [c.name for c in categories]
    root = normalize_root(root)
    cfg = device_from_env(config)
    logger.info("categories: %s; artifacts under %s; device %s", ", ".join(names), root, cfg.model.device)

    data = gather(
        on_root(prepare_data_task, root).map(
            categories, [source_fingerprint(c) for c in categories], unmapped(cfg.data), unmapped(root)
        ),
        names,
        "prepare-data",
    )
    loras = gather(
        on_root(finetune_task, root).map(
            names,
            data,
            unmapped(cfg.model),
            unmapped(cfg.data),
            unmapped(cfg.lora),
            unmapped(root),
            unmapped(cfg.resume),
        ),
        names,
        "finetune-lora",
    )
    needs_lora = cfg.task_vector.source == "hidden_state" and cfg.task_vector.hidden_from == "finetuned"
    vectors = gather(
        on_root(task_vector_task, root).map(
            categories,
            data,
            loras if needs_lora else unmapped(None),
            unmapped(cfg.model),
            unmapped(cfg.data),
            unmapped(cfg.task_vector),
            unmapped(root),
        ),
        names,
        "task-vector",
    )
    lora_by_name = dict(zip(names, loras, strict=True))
    vector_by_name = dict(zip(names, vectors, strict=True))
    methods = set(cfg.methods) | {"base", "lora", "icm_lora"}
    generator: ArtifactRef = on_root(train_generator_task, root)(
        lora_by_name, vector_by_name, cfg.cvae, cfg.model.device, root, cfg.resume
    )
    by_method: dict[str, list] = {"base": [None] * len(names), "lora": loras}
    by_method["icm_lora"] = gather(
        on_root(sample_adapter_task, root).map(names, unmapped(generator), unmapped(cfg.sample), unmapped(root)),
        names,
        "sample",
    )
    baselines = baseline_adapters(methods, names, lora_by_name, vector_by_name, cfg, cfg.model.device, root)
    by_method.update(baselines.adapters)
    soups, pdiff = baselines.soups, baselines.pdiff
    eval_futures, labels = [], []
    for method in METHOD_NAMES:
        if method not in by_method:
            continue
        eval_futures += on_root(evaluate_task, root).map(
            names,
            unmapped(method),
            data,
            by_method[method],
            unmapped(cfg.model),
            unmapped(cfg.data),
            unmapped(cfg.eval),
            unmapped(root),
        )
        labels += [f"{n} ({method})" for n in names]
    scores = gather(eval_futures, labels, "evaluate")
    evals = {name: {} for name in names}
    for ref in scores:
        evals[ref.category][ref.meta["method"]] = ref
    adapters = dict(zip(names, by_method["icm_lora"], strict=True))
    report = on_root(report_task, root)(
        evals,
        adapters,
        generator,
        root,
        data=dict(zip(names, data, strict=True)),
        loras=lora_by_name,
        task_vectors=vector_by_name,
        pdiff=pdiff,
        soups=soups,
    )
    if publish:
        publish_report(report, generator, pdiff)
    summary = {
        "rows": report.meta["rows"],
        "report": str(report.file("report.md")),
        "results_json": str(report.file("results.json")),
        "generator": str(generator.file("generator.safetensors")),
        "generator_meta": generator.meta,
        "report_dir": str(report.folder),
        "storage": report.meta["storage"],
    }
    write_root_json(root, pointer, summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the ICM-LoRA Prefect pipeline (local Prefect by default).")
    parser.add_argument("--config", help="YAML/JSON run config (sections model, data, lora, task_vector, cvae, ...)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="config override")
    parser.add_argument("--categories", help="category file (default: the five built-in demo categories)")
    parser.add_argument("--only", help="comma-separated category names")
    parser.add_argument("--root", default="artifacts", help="artifacts folder or fsspec URL")
    parser.add_argument("--runner", choices=RUNNERS, default="threads", help="task runner (default: threads)")
    parser.add_argument("--runner-address", help="Dask scheduler / Ray address (default: start a local cluster)")
    parser.add_argument("--workers", type=int, help="local cluster size / thread pool size")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="re-hash every reused output and model file (slow; default: sizes+mtimes)",
    )
    args = parser.parse_args(argv)
    try:
        cfg = load_run_config(args.config, args.set)
        runner = make_task_runner(args.runner, args.runner_address, args.workers)
    except (ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    only = [n.strip() for n in args.only.split(",")] if args.only else None
    try:
        select_categories(args.categories, only)  # a bad category file fails here, before any flow run starts
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        summary = icm_pipeline.with_options(task_runner=runner)(
            config=cfg, categories_file=args.categories, only=only, root=args.root, verify=args.verify
        )
    except (ValueError, RuntimeError, OSError) as exc:  # CategoryFailed, DataError, ModelLoadError, ArtifactError
        print(f"error: pipeline run failed: {exc}", file=sys.stderr)
        return 1
    print()
    print(format_table(summary["rows"]))
    print()
    print(f"report:    {summary['report']}")
    print(f"generator: {summary['generator']}")
    print("adapters:")
    for row in summary["rows"]:
        print(f"  {row['category']:<14} {row['adapter_dir']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
