"""The ICM-LoRA pipeline flow: every category fanned out, one generator, then sampling and evaluation.

    data -> LoRA fine-tune -> task vector      (per category, .map)
         -> one CVAE for all categories            -> sample ICM-LoRA adapter   (per category)
         -> baselines: Model Soup (weight-delta average), COND P-DIFF (AE + latent DDPM) -> their adapters
         -> evaluate base / LoRA / Model Soup / COND P-DIFF / ICM-LoRA   (per category, .map)
         -> report (tables, storage, figures; files + Prefect table, markdown, image and link artifacts)

Every task is cached by its inputs' content (see ``tasks/artifacts.py``), so a second run is all cache
hits, a killed run resumes where it stopped (inside the long stages too: ``RunConfig.resume``), and
changing one stage's config reruns that stage and what follows it. Prefect's result records are kept
inside the artifacts root (``tasks/result_records.py``). Run it with ``icm-lora pipeline`` (see
``--help``) or as a deployment.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, unmapped

from flows.runtime import confine_deployment_run, device_from_env, thread_task_runner, use_hub_token
from flows.steps import Baselines, baseline_adapters, bound, finetune_categories, gather
from icm_core.config import METHOD_NAMES, RunConfig
from icm_core.data.categories import Category
from icm_core.data.documents import source_fingerprint
from icm_core.data.selection import select_categories
from icm_core.lora.trajectory import read_trajectory
from icm_core.models.base_model import resolve_device
from icm_core.report.pipeline import FIGURES
from tasks.artifacts import ArtifactRef, localize
from tasks.baselines import sample_pdiff_task
from tasks.data import prepare_data_task
from tasks.evaluation import diagnostics_task, evaluate_task
from tasks.generator import sample_adapter_task, task_vector_task, train_generator_task
from tasks.lora import finetune_task
from tasks.manifest import VERIFY_ENV
from tasks.report import publish_report, report_task
from tasks.result_records import on_root
from tasks.store import normalize_root, write_root_json


def _run_name() -> str:
    from prefect.runtime import flow_run

    params = flow_run.parameters
    only = params.get("only")
    return f"icm-pipeline-{'-'.join(only) if only else 'all'}"


def seed_config(cfg: RunConfig, index: int) -> RunConfig:
    """The config of seed ``index``: ``index`` added to the LoRA, CVAE, COND P-DIFF and sampling seeds (the data
    split and the task-vector samples stay fixed, so every seed is scored on the same test blocks)."""
    if index == 0:
        return cfg
    tree = cfg.model_dump(mode="json")
    for section in ("lora", "cvae", "pdiff", "sample"):
        tree[section]["seed"] += index
    return RunConfig.model_validate(tree)


@dataclass
class SeedRun:
    """Everything one seed produced: refs per category (``names`` order) and the evaluations."""

    loras: dict[str, ArtifactRef]
    vectors: dict[str, ArtifactRef]
    generator: ArtifactRef
    adapters: list[ArtifactRef]
    baselines: Baselines
    evals: dict[str, dict[str, ArtifactRef]]
    z_evals: dict[str, list[ArtifactRef]]
    diagnostics: dict[str, ArtifactRef]


def run_seed(
    cfg: RunConfig, categories: list[Category], data: list[ArtifactRef], root: str, index: int = 0
) -> SeedRun:
    """Fine-tune, train the generators, sample, build the references and evaluate, for one seed's config.
    Seed ``index`` > 0 suffixes its task run names with ``-seed<index>``."""
    names = [c.name for c in categories]
    sfx = f"-seed{index}" if index else ""
    loras = finetune_categories(bound(finetune_task, root, sfx), names, data, cfg, root)
    needs_lora = cfg.task_vector.source == "hidden_state" and cfg.task_vector.hidden_from == "finetuned"
    vectors = gather(
        bound(task_vector_task, root, sfx).map(
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
    # The generator stops early on its adapters' validation NLL (the categories' validation splits).
    generator: ArtifactRef = bound(train_generator_task, root, sfx)(
        lora_by_name,
        vector_by_name,
        cfg.cvae,
        cfg.model.device,
        root,
        cfg.resume,
        data=dict(zip(names, data, strict=True)),
        model_cfg=cfg.model,
        data_cfg=cfg.data,
    )
    by_method: dict[str, list] = {"base": [None] * len(names), "lora": loras}
    by_method["icm_lora"] = gather(
        bound(sample_adapter_task, root, sfx).map(names, unmapped(generator), unmapped(cfg.sample), unmapped(root)),
        names,
        "sample",
    )
    baselines = baseline_adapters(methods, names, lora_by_name, vector_by_name, cfg, cfg.model.device, root, sfx)
    by_method.update(baselines.adapters)

    # Extra z draws (sample.seed + 1, ...) for the generator diagnostics; draw 0 is the scored adapter.
    draws = cfg.diagnostics.z_draws
    icm_draws = {n: [a] for n, a in zip(names, by_method["icm_lora"], strict=True)}
    pdiff_draws = {n: [a] for n, a in zip(names, by_method.get("cond_pdiff", []), strict=False)}
    shared_draws = {n: [a] for n, a in zip(names, by_method.get("cond_pdiff_shared", []), strict=False)}
    for k in range(1, draws):
        sample_k = cfg.sample.model_copy(update={"seed": cfg.sample.seed + k})
        refs = gather(
            bound(sample_adapter_task, root, f"-z{k}{sfx}").map(
                names, unmapped(generator), unmapped(sample_k), unmapped(root)
            ),
            names,
            "sample-z",
        )
        for n, ref in zip(names, refs, strict=True):
            icm_draws[n].append(ref)
        for variant, model_ref, store in (
            ("", baselines.pdiff, pdiff_draws),
            ("-shared", baselines.pdiff_shared, shared_draws),
        ):
            if model_ref is None:
                continue
            refs = bound(sample_pdiff_task, root, f"{variant}-z{k}{sfx}")(names, model_ref, sample_k, root)
            for n, ref in zip(names, refs, strict=True):
                store[n].append(ref)
    diagnose = bound(diagnostics_task, root, sfx)
    diagnostics = {"icm_lora": diagnose("icm_lora", icm_draws, lora_by_name, root, generator, vector_by_name)}
    if pdiff_draws:
        diagnostics["cond_pdiff"] = diagnose("cond_pdiff", pdiff_draws, lora_by_name, root)
    if shared_draws:
        diagnostics["cond_pdiff_shared"] = diagnose("cond_pdiff_shared", shared_draws, lora_by_name, root)

    evaluate = bound(evaluate_task, root, sfx)
    eval_futures, labels = [], []
    for method in METHOD_NAMES:
        if method not in by_method:
            continue
        eval_futures += evaluate.map(
            names,
            unmapped(method),
            data,
            by_method[method],
            unmapped(cfg.model),
            unmapped(cfg.data),
            unmapped(cfg.eval),
            unmapped(root),
            # The base model's pass fills the shared-prefix cache that the category's adapters reuse.
            prefix_like=loras if method == "base" else unmapped(None),
        )
        labels += [f"{n} ({method})" for n in names]
    z_futures, z_labels = [], []
    if cfg.diagnostics.score_z_draws:
        for k in range(1, draws):
            z_futures += evaluate.map(
                names,
                unmapped(f"icm_lora@z{k}"),
                data,
                [icm_draws[n][k] for n in names],
                unmapped(cfg.model),
                unmapped(cfg.data),
                unmapped(cfg.eval),
                unmapped(root),
            )
            z_labels += [f"{n} (icm_lora z{k})" for n in names]
    scores = gather(eval_futures, labels, "evaluate")
    z_scores = gather(z_futures, z_labels, "evaluate-z") if z_futures else []
    evals: dict[str, dict[str, ArtifactRef]] = {name: {} for name in names}
    for ref in scores:
        evals[ref.category][ref.meta["method"]] = ref
    z_evals: dict[str, list[ArtifactRef]] = {name: [] for name in names}
    for ref in z_scores:
        z_evals[ref.category].append(ref)
    return SeedRun(
        lora_by_name, vector_by_name, generator, by_method["icm_lora"], baselines, evals, z_evals, diagnostics
    )


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


@flow(name="icm-pipeline", task_runner=thread_task_runner(), flow_run_name=_run_name, log_prints=True)
def icm_pipeline(
    config: RunConfig = RunConfig(),  # noqa: B008 - pydantic default, shown as a form in the UI
    categories_file: str | None = None,
    only: list[str] | None = None,
    root: str = "artifacts",
    publish: bool = True,
    verify: bool = False,
    pointer: str = "latest.json",
) -> dict[str, Any]:
    """Fine-tune every category, train one ICM-LoRA generator, generate and evaluate an adapter per category,
    once per seed (``config.seeds``).

    Args:
        config: All stage configs (model, data, lora, task_vector, cvae, sample, eval, ...) and ``seeds``;
            defaults are the one-seed CPU demo.
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
    confine_deployment_run(root, {"categories_file": categories_file}, config=config)  # before any read
    categories = select_categories(categories_file, only)
    names = [c.name for c in categories]
    root = normalize_root(root)
    cfg = device_from_env(config)
    resolve_device(cfg.model.device)  # a device this machine lacks fails the run here, before any task (no retry)
    use_hub_token(logger)
    logger.info(
        "categories: %s; artifacts under %s; device %s; %d seed(s)",
        ", ".join(names),
        root,
        cfg.model.device,
        cfg.seeds,
    )

    data = gather(
        on_root(prepare_data_task, root).map(
            categories, [source_fingerprint(c) for c in categories], unmapped(cfg.data), unmapped(root)
        ),
        names,
        "prepare-data",
    )
    runs = []
    for index in range(cfg.seeds):  # one seed after the other: a partial multi-seed run keeps whole seeds
        logger.info("seed %d of %d", index + 1, cfg.seeds)
        runs.append(run_seed(seed_config(cfg, index), categories, data, root, index))
    first = runs[0]
    adapters = dict(zip(names, first.adapters, strict=True))
    report = on_root(report_task, root)(
        [run.evals for run in runs],
        adapters,
        first.generator,
        root,
        data=dict(zip(names, data, strict=True)),
        loras=first.loras,
        task_vectors=first.vectors,
        pdiff=first.baselines.pdiff,
        soups=first.baselines.soups,
        diagnostics=[run.diagnostics for run in runs],
        z_evals=[run.z_evals for run in runs],
        pdiff_shared=first.baselines.pdiff_shared,
    )
    if publish:
        publish_report(report, first.generator, first.baselines.pdiff)
    summary = {
        "rows": report.meta["rows"],
        "seeds": cfg.seeds,
        "report": str(report.file("report.md")),
        "results_json": str(report.file("results.json")),
        "generator": str(first.generator.file("generator.safetensors")),
        "generator_meta": first.generator.meta,
        "report_dir": str(report.folder),
        "storage": report.meta["storage"],
        # Each category's own fine-tuned LoRA: the registry serves it, and a new category's selector chooses among
        # them (flows/retrain.py).
        "lora_adapters": {
            name: str(read_trajectory(localize(ref, root).folder).adapter_dir) for name, ref in first.loras.items()
        },
    }
    write_root_json(root, pointer, summary)
    return summary


REPORT_FILES = ("report.md", "results.json", "results.csv", "storage.csv", *FIGURES)


def copy_report(report_dir: str, target: str) -> str:
    """Copy a report's files into ``target`` (e.g. ``results/demo``), replacing what is there."""
    out = Path(target)
    out.mkdir(parents=True, exist_ok=True)
    for name in REPORT_FILES:
        source = Path(report_dir) / name
        if source.is_file():
            shutil.copyfile(source, out / name)
    return str(out)
