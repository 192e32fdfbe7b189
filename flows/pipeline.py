"""The ICM-LoRA pipeline flow: every category fanned out, one generator, then sampling and evaluation.

    data -> LoRA fine-tune -> task vector      (per category, .map)
         -> one CVAE for all categories            -> sample ICM-LoRA adapter   (per category)
         -> baselines: Model Soup (weight-delta average), COND P-DIFF (AE + latent DDPM) -> their adapters
         -> evaluate base / LoRA / Model Soup / COND P-DIFF / ICM-LoRA   (per category, .map)
         -> report (tables, storage, figures; files + Prefect table, markdown, image and link artifacts)

Every task is cached by its inputs' content (see ``tasks/artifacts.py``), so a second run is all cache
hits, a killed run resumes where it stopped, and changing one stage's config reruns that stage and
what follows it. Run it with ``python -m flows.pipeline`` (see ``--help``) or as a deployment.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from prefect import flow, get_run_logger, unmapped
from prefect.futures import PrefectFuture, wait

from flows.runtime import device_from_env, use_hub_token
from icm_core.base_model import resolve_device
from icm_core.config import METHOD_NAMES, RunConfig
from icm_core.data import Category, DataError, builtin_categories, iter_documents, source_fingerprint
from icm_core.registry import load_registry
from tasks.artifacts import ArtifactRef
from tasks.progress import track
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
    """Wait for fanned-out task runs and return their results, or fail naming every failed category.

    A progress artifact of the flow run counts the finished task runs of the stage (evaluation, task
    vectors, sampling, ... show how far they are in the UI).
    """
    for _ in track(futures, f"{stage} ({len(futures)} task runs)"):
        pass
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
    if "model_soup" in methods:
        if cfg.soup.scope == "all_categories":
            out.soups = {"all": soup_task("all", lora_by_name, cfg.soup, root)}
            out.adapters["model_soup"] = [out.soups["all"]] * len(names)
        else:
            refs = gather(
                soup_task.map(names, [{n: lora_by_name[n]} for n in names], unmapped(cfg.soup), unmapped(root)),
                names,
                "model-soup",
            )
            out.soups = dict(zip(names, refs, strict=True))
            out.adapters["model_soup"] = refs
    if "cond_pdiff" in methods:
        out.pdiff = train_pdiff_task(lora_by_name, vector_by_name, cfg.pdiff, device, root)
        out.adapters["cond_pdiff"] = gather(
            sample_pdiff_task.map(names, unmapped(out.pdiff), unmapped(cfg.sample), unmapped(root)),
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


def check_category_sources(categories: Sequence[Category]) -> list[Category]:
    """Fail early, naming the category and file, when a user category's source is missing or holds no text.

    Reads each source only up to its first non-empty document (built-in sources ship with the install), so
    the CLI can refuse a bad category file in well under a second, before any Prefect server starts.

    Raises:
        DataError: A source is missing, unreadable or empty.
    """
    for category in categories:
        if category.is_builtin:
            continue
        source_fingerprint(category)  # every file of the source exists
        if next(iter_documents(category), None) is None:
            raise DataError(f"category {category.name!r}: source {category.source} is empty (no non-whitespace text)")
    return list(categories)


def _run_name() -> str:
    from prefect.runtime import flow_run

    params = flow_run.parameters
    only = params.get("only")
    return f"icm-pipeline-{'-'.join(only) if only else 'all'}"


@flow(name="icm-pipeline", flow_run_name=_run_name, log_prints=True)
def icm_pipeline(
    config: RunConfig = RunConfig(),  # noqa: B008 - pydantic default, shown as a form in the UI
    categories_file: str | None = None,
    only: list[str] | None = None,
    root: str = "artifacts",
    publish: bool = True,
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
    """
    logger = get_run_logger()
    categories = select_categories(categories_file, only)
    names = [c.name for c in categories]
    root = normalize_root(root)
    cfg = device_from_env(config)
    resolve_device(cfg.model.device)  # a device this machine lacks fails the run here, before any task (no retry)
    use_hub_token(logger)
    logger.info("categories: %s; artifacts under %s; device %s", ", ".join(names), root, cfg.model.device)

    data = gather(
        prepare_data_task.map(
            categories, [source_fingerprint(c) for c in categories], unmapped(cfg.data), unmapped(root)
        ),
        names,
        "prepare-data",
    )
    loras = gather(
        finetune_task.map(names, data, unmapped(cfg.model), unmapped(cfg.data), unmapped(cfg.lora), unmapped(root)),
        names,
        "finetune-lora",
    )
    needs_lora = cfg.task_vector.source == "hidden_state" and cfg.task_vector.hidden_from == "finetuned"
    vectors = gather(
        task_vector_task.map(
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
    generator: ArtifactRef = train_generator_task(lora_by_name, vector_by_name, cfg.cvae, cfg.model.device, root)
    by_method: dict[str, list] = {"base": [None] * len(names), "lora": loras}
    by_method["icm_lora"] = gather(
        sample_adapter_task.map(names, unmapped(generator), unmapped(cfg.sample), unmapped(root)), names, "sample"
    )
    baselines = baseline_adapters(methods, names, lora_by_name, vector_by_name, cfg, cfg.model.device, root)
    by_method.update(baselines.adapters)
    soups, pdiff = baselines.soups, baselines.pdiff
    eval_futures, labels = [], []
    for method in METHOD_NAMES:
        if method not in by_method:
            continue
        eval_futures += evaluate_task.map(
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
    report = report_task(
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
    write_root_json(root, "latest.json", summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    """``python -m flows.pipeline``: an alias of ``icm-lora pipeline`` (flows/cli.py)."""
    from flows.cli import alias

    return alias("pipeline", argv)


if __name__ == "__main__":
    raise SystemExit(main())
