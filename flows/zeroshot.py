"""The leave-out protocol as a cached Prefect flow: adapters for categories the generator has never seen.

    data, oracle LoRA, base-model task vector        (every category, .map; the vector needs only its text)
    for each of K folds (deterministic over category names):
        train only on the other folds' categories:   ICM-LoRA generator, mean LoRA, multi-task LoRA (pooled text)
                                                      (+ generators on nested subsets of them: the scaling curve)
        for each held-out category:                   ICM-LoRA zero-shot, shuffled-vector and mean-condition
                                                      controls, 1-NN and softmax k-NN by the same task vector
        per-block NLL of every method on the fold's held-out test splits -> interim report (results/interim/)
    the cross-category matrix (every category's own LoRA on every category's test text)
    -> gap recovered (base = 0, oracle = 1), paired bootstrap intervals, win rates -> results/zeroshot/

Every stage is cached by its inputs (see ``tasks/artifacts.py``): a rerun reuses everything finished, a killed
run resumes, and the heavy benchmark can be split across sessions. Run it with ``make zeroshot`` or
``icm-lora zeroshot --help``.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, unmapped

from flows.runtime import device_from_env, thread_task_runner
from flows.steps import finetune_categories, gather
from icm_core.data.categories import Category, category_family, library_categories
from icm_core.data.documents import source_fingerprint
from icm_core.data.registry import load_registry
from icm_core.report.zeroshot import interim_dir
from icm_core.zeroshot.config import ZeroShotRunConfig
from icm_core.zeroshot.protocol import SCALING_PREFIX, assert_no_leakage, make_folds, scaling_subsets, shuffled_partner
from tasks.artifacts import ArtifactRef
from tasks.data import prepare_data_task
from tasks.evaluation import evaluate_task
from tasks.generator import task_vector_task, train_generator_task
from tasks.lora import finetune_task
from tasks.report import zeroshot_report_task
from tasks.result_records import on_root
from tasks.store import normalize_root
from tasks.zeroshot import (
    functional_generator_task,
    library_adapter_task,
    pool_data_task,
    selector_task,
    vector_adapter_task,
)


NO_BUDGET_S = 1e9
"""The selector's time budget in the benchmark: none (the mix and the fine-tune always run)."""


def select(categories_file: str | None, only: list[str] | None) -> list[Category]:
    """The library (default) or a category file / registry folder, optionally only some names."""
    categories = load_registry(categories_file) if categories_file else library_categories()
    if only:
        names = {c.name for c in categories}
        unknown = sorted(set(only) - names)
        if unknown:
            raise ValueError(f"only: unknown categories {unknown}")
        categories = [c for c in categories if c.name in set(only)]
    return categories


@flow(name="icm-zeroshot", task_runner=thread_task_runner(), log_prints=True)
def zeroshot_protocol(
    config: ZeroShotRunConfig = ZeroShotRunConfig(),  # noqa: B008 - pydantic default, a form in the UI
    categories_file: str | None = None,
    only: list[str] | None = None,
    root: str = "artifacts",
    results_dir: str = "results/zeroshot",
) -> dict[str, Any]:
    """Run the leave-out protocol over the category library (or a category file) and write ``results_dir``.

    Args:
        config: Model, data, LoRA, task-vector, CVAE, sampling, evaluation and protocol settings.
        categories_file: A category file or registry folder; default: the whole library (``make corpora`` first).
        only: Run just these categories.
        root: Artifacts root (local folder).
        results_dir: Where summary.json, report.md, per_category.csv and the figures go.
    """
    logger = get_run_logger()
    cfg = device_from_env(config)
    root = normalize_root(root)
    zs = cfg.zeroshot
    # Every task keeps its result records inside the artifacts root (tasks/result_records.py).
    prepare, finetune, task_vector, train_generator = (
        on_root(t, root) for t in (prepare_data_task, finetune_task, task_vector_task, train_generator_task)
    )
    functional_generator, library_adapter, pool_data, vector_adapter, evaluate, report, selector = (
        on_root(t, root)
        for t in (
            functional_generator_task,
            library_adapter_task,
            pool_data_task,
            vector_adapter_task,
            evaluate_task,
            zeroshot_report_task,
            selector_task,
        )
    )
    categories = select(categories_file, only)
    names = [c.name for c in categories]
    folds = make_folds(names, zs.folds, zs.fold_seed)
    logger.info("%d categories in %d folds: %s", len(names), len(folds), folds)

    # 1) Per category, from its own text only: splits, its own fine-tune (the oracle, and the library's
    #    adapter when the category is in a training fold) and its task vector (base model or description).
    data = gather(
        prepare.map(categories, [source_fingerprint(c) for c in categories], unmapped(cfg.data), unmapped(root)),
        names,
        "prepare-data",
    )
    loras = finetune_categories(finetune, names, data, cfg, root)
    vectors = gather(
        task_vector.map(
            categories, data, unmapped(None), unmapped(cfg.model), unmapped(cfg.data), unmapped(cfg.task_vector),
            unmapped(root),
        ),
        names,
        "task-vector",
    )  # fmt: skip
    data_by, lora_by, vector_by = (dict(zip(names, x, strict=True)) for x in (data, loras, vectors))
    families = {c.name: category_family(c) for c in categories}
    meta = {
        "config": cfg.model_dump(mode="json"),
        "fold_assignment": folds,
        "task_vector_kind": vector_by[names[0]].meta.get("kind"),
    }

    adapters: dict[str, dict[str, ArtifactRef | None]] = {n: {"base": None, "oracle": lora_by[n]} for n in names}
    multitask: dict[str, ArtifactRef] = {}
    nll_refs: dict[str, dict[str, ArtifactRef]] = {}
    for i, held_out in enumerate(folds):
        label = f"fold-{i}"
        train = [n for n in names if n not in held_out]
        # 2) Everything this fold trains sees the training categories only; checked before anything is built.
        train_loras = {n: lora_by[n] for n in train}
        train_vectors = {n: vector_by[n] for n in train}
        train_data = {n: data_by[n] for n in train}
        subsets = scaling_subsets(train, zs.scaling_sizes, zs.fold_seed + i)  # the scaling curve's training sets
        assert_no_leakage(
            held_out,
            {"generator trajectories": list(train_loras), "generator task vectors": list(train_vectors),
             "multi-task text": list(train_data), "k-NN library": list(train_loras),
             **{f"scaling generator ({size} categories)": subset for size, subset in subsets.items()}},
        )  # fmt: skip
        generator = train_generator(train_loras, train_vectors, cfg.cvae, cfg.model.device, root, cfg.resume)
        scaled = {
            size: train_generator(
                {n: lora_by[n] for n in subset}, {n: vector_by[n] for n in subset}, cfg.cvae, cfg.model.device, root,
                cfg.resume,
            )
            for size, subset in subsets.items()
        }  # fmt: skip
        functional = None
        if zs.functional_steps > 0:  # the generator variant aimed at unseen categories (decoder through the LM)
            functional = functional_generator(
                label, generator, train_loras, train_vectors, train_data, cfg.model, cfg.data, zs.functional_steps,
                zs.functional_lr, zs.functional_batch_blocks, zs.functional_recon_weight, root,
            )  # fmt: skip
        mean = library_adapter(label, "mean_lora", train_loras, train_vectors, None, 1, 1.0, root)
        pooled = pool_data(label, train_data, root)
        multitask_cfg = cfg.lora.model_copy(update={"steps": zs.multitask_steps})
        multitask[label] = finetune(f"multitask-{label}", pooled, cfg.model, cfg.data, multitask_cfg, root, cfg.resume)
        partner = shuffled_partner(held_out)
        # The benchmark's choice must not depend on the machine's load: no time budget for the optional candidates.
        selector_cfg = cfg.selector.model_copy(update={"budget_s": NO_BUDGET_S})
        mean_condition = [vector_by[n] for n in train]
        for cat in held_out:
            query = vector_by[cat]
            adapters[cat]["mean_lora"] = mean
            adapters[cat]["multitask_lora"] = multitask[label]
            for method, k in (("nn1", 1), ("knn_softmax", zs.knn_k)):
                adapters[cat][method] = library_adapter(
                    cat, method, train_loras, train_vectors, query, k, zs.knn_temperature, root
                )
            adapters[cat]["icm_lora"] = vector_adapter(cat, "icm_lora", generator, [query], cfg.sample, root)
            for size, smaller in scaled.items():
                method = f"{SCALING_PREFIX}{size}"
                adapters[cat][method] = vector_adapter(cat, method, smaller, [query], cfg.sample, root)
            if functional is not None:
                adapters[cat]["icm_functional"] = vector_adapter(
                    cat, "icm_functional", functional, [query], cfg.sample, root
                )
            adapters[cat]["icm_shuffled"] = vector_adapter(
                cat, "icm_shuffled", generator, [vector_by[partner[cat]]], cfg.sample, root
            )
            adapters[cat]["icm_mean_condition"] = vector_adapter(
                cat, "icm_mean_condition", generator, mean_condition, cfg.sample, root
            )
            # The selector: every candidate above the fold's library gives, plus the training categories' own
            # LoRAs, a mix and a fine-tune, chosen on the held-out category's train-split samples only.
            adapters[cat]["selector"] = selector(
                cat, data_by[cat], multitask[label], {"mean_lora": mean, "knn_softmax": adapters[cat]["knn_softmax"]},
                train_loras, {"icm_lora": generator}, query, cfg.model, cfg.task_vector, selector_cfg, root,
            )  # fmt: skip
            meta.setdefault("selector_picks", {})[cat] = adapters[cat]["selector"].meta.get("winner")
        if zs.interim_reports:
            # 3) This fold's scores as soon as its adapters exist, and a report over the folds done so far: a
            #    benchmark split across sessions shows numbers before its last fold.
            nll_refs.update(held_out_evals(evaluate, held_out, adapters, data_by, lora_by, cfg, root))
            if i < len(folds) - 1:
                report(
                    nll_refs, folds, multitask, vector_by, families, meta, zs.bootstrap_samples, zs.seed, root,
                    str(interim_dir(results_dir)),
                )  # fmt: skip

    # 3) The categories not scored yet (every one without interim reports: all folds' evaluations then run
    #    side by side): per-block NLL of every method on each held-out category's test split.
    nll_refs.update(
        held_out_evals(evaluate, [n for n in names if n not in nll_refs], adapters, data_by, lora_by, cfg, root)
    )
    nll_refs = {n: nll_refs[n] for n in names}

    # 4) The cross-category matrix (every category's own LoRA on every category's test text): are they distinct?
    #    After the protocol's own scores, so a long matrix never delays the headline numbers.
    cross = cross_category_evals(evaluate, names, data_by, lora_by, cfg, root) if zs.cross_matrix_tokens else None

    out = report(
        nll_refs, folds, multitask, vector_by, families, meta, zs.bootstrap_samples, zs.seed, root, results_dir, cross,
        lora_by,
    )  # fmt: skip
    summary = out["summary"]
    logger.info("macro gap recovered: %s", {m: round(v, 3) for m, v in summary["macro_gain"].items()})
    return out


def held_out_evals(
    evaluate, held_out: list[str], adapters: dict, data_by: dict, lora_by: dict, cfg: ZeroShotRunConfig, root: str
) -> dict[str, dict[str, ArtifactRef]]:
    """Per-block NLL of every method's adapter (``adapters[category][method]``; None is the base model) on each
    ``held_out`` category's test split: ``{category: {method: ref}}``."""
    futures, labels, keys = [], [], []
    for cat in held_out:
        for method, adapter in adapters[cat].items():
            like = lora_by[cat] if adapter is None else None  # the base pass fills the prefix for the adapters
            futures.append(
                evaluate.submit(cat, method, data_by[cat], adapter, cfg.model, cfg.data, cfg.eval, root, like)
            )
            labels.append(f"{cat} ({method})")
            keys.append((cat, method))
    refs = gather(futures, labels, "evaluate")
    out: dict[str, dict[str, ArtifactRef]] = {cat: {} for cat in held_out}
    for (cat, method), ref in zip(keys, refs, strict=True):
        out[cat][method] = ref
    return out


def cross_category_evals(
    evaluate, names: list[str], data_by: dict, lora_by: dict, cfg: ZeroShotRunConfig, root: str
) -> dict[str, dict[str, Any]]:
    """Per-block NLL of the base model and of every category's own LoRA on every category's test text, at
    ``zeroshot.cross_matrix_tokens`` tokens: ``{"base": {target: ref}, "lora": {target: {source: ref}}}``.
    The diagonal is named ``oracle`` and the base ``base``, as in the protocol, so with the protocol's token
    budget those evaluations are the same cached outputs."""
    eval_cfg = cfg.eval.model_copy(update={"max_tokens": cfg.zeroshot.cross_matrix_tokens})
    futures, keys = [], []
    for target in names:  # one target's evaluations together: they share its prefix states
        for source in (None, *names):
            method = "base" if source is None else "oracle" if source == target else f"lora-of-{source}"
            adapter = None if source is None else lora_by[source]
            like = lora_by[target] if source is None else None
            futures.append(
                evaluate.submit(target, method, data_by[target], adapter, cfg.model, cfg.data, eval_cfg, root, like)
            )
            keys.append((target, source))
    refs = gather(futures, [f"{t} <- {s or 'base'}" for t, s in keys], "cross-category")
    out: dict[str, dict[str, Any]] = {"base": {}, "lora": {t: {} for t in names}}
    for (target, source), ref in zip(keys, refs, strict=True):
        if source is None:
            out["base"][target] = ref
        else:
            out["lora"][target][source] = ref
    return out
