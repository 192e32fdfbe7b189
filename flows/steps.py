"""Steps several flows share: wait for a fan-out and name what failed, bind tasks to a root, the fine-tunes of
a set of categories, and the baseline adapters."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from prefect import unmapped
from prefect.futures import PrefectFuture, wait

from tasks.artifacts import ArtifactRef
from tasks.baselines import sample_pdiff_task, soup_task, train_pdiff_task
from tasks.lora import trajectory_mean_task
from tasks.progress import track
from tasks.result_records import on_root


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
    pdiff_shared: ArtifactRef | None = None


def finetune_categories(finetune, names: Sequence[str], data: Sequence[ArtifactRef], cfg, root: str) -> list[Any]:
    """One LoRA fine-tune per category (``finetune``: the fine-tune task, bound to its root), fanned out with
    ``.map`` over the categories' data refs; ``cfg`` is a run config (its model, data, lora and resume
    sections). Returns the trajectory refs in the order of ``names``."""
    futures = finetune.map(
        list(names), list(data), unmapped(cfg.model), unmapped(cfg.data), unmapped(cfg.lora), unmapped(root),
        unmapped(cfg.resume),
    )  # fmt: skip
    return gather(futures, names, "finetune-lora")


def renamed(task_obj, suffix: str):
    """The task with ``suffix`` appended to its run name (extra z draws, seeds and variants get their own names)."""
    name = task_obj.task_run_name
    if not suffix or not isinstance(name, str):
        return task_obj
    return task_obj.with_options(task_run_name=name + suffix)


def bound(task_obj, root: str, suffix: str = ""):
    """The task with its result records inside ``root`` (``tasks/result_records.py``), ``suffix`` on its run name."""
    return renamed(on_root(task_obj, root), suffix)


def baseline_adapters(
    methods: Collection[str],
    names: list[str],
    lora_by_name: dict[str, ArtifactRef],
    vector_by_name: dict[str, ArtifactRef],
    cfg: Any,
    device: str,
    root: str,
    suffix: str = "",
) -> Baselines:
    """Reference and baseline adapters for the methods asked for, from the same trajectories and task vectors as
    the generator (``cfg`` has ``soup``, ``pdiff`` and ``sample`` sections): the trajectory mean and Model Soup
    of each category's own checkpoints, the ``soup.scope`` Model Soup, COND P-DIFF and its shared-normalisation
    variant. Shared by the language and the detection pipelines."""
    out = Baselines()
    if "trajectory_mean" in methods:
        out.adapters["trajectory_mean"] = gather(
            bound(trajectory_mean_task, root, suffix).map(names, [lora_by_name[n] for n in names], unmapped(root)),
            names,
            "trajectory-mean",
        )
    if "soup_own" in methods:
        own_cfg = cfg.soup.model_copy(update={"scope": "trajectory"})
        out.adapters["soup_own"] = gather(
            bound(soup_task, root, "-own" + suffix).map(
                names, [{n: lora_by_name[n]} for n in names], unmapped(own_cfg), unmapped(root)
            ),
            names,
            "model-soup-own",
        )
    if "model_soup" in methods:
        if cfg.soup.scope == "all_categories":
            out.soups = {"all": bound(soup_task, root, suffix)("all", lora_by_name, cfg.soup, root)}
            out.adapters["model_soup"] = [out.soups["all"]] * len(names)
        else:
            refs = gather(
                bound(soup_task, root, suffix).map(
                    names, [{n: lora_by_name[n]} for n in names], unmapped(cfg.soup), unmapped(root)
                ),
                names,
                "model-soup",
            )
            out.soups = dict(zip(names, refs, strict=True))
            out.adapters["model_soup"] = refs
    if "cond_pdiff" in methods:
        out.pdiff = bound(train_pdiff_task, root, suffix)(
            lora_by_name, vector_by_name, cfg.pdiff, device, root, cfg.resume
        )
        out.adapters["cond_pdiff"] = bound(sample_pdiff_task, root, suffix)(names, out.pdiff, cfg.sample, root)
    if "cond_pdiff_shared" in methods:
        shared_cfg = cfg.pdiff.model_copy(update={"normalization": "shared"})
        out.pdiff_shared = bound(train_pdiff_task, root, "-shared" + suffix)(
            lora_by_name, vector_by_name, shared_cfg, device, root, cfg.resume
        )
        out.adapters["cond_pdiff_shared"] = bound(sample_pdiff_task, root, "-shared" + suffix)(
            names, out.pdiff_shared, cfg.sample, root
        )
    return out
