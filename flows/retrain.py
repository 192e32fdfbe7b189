"""Retraining when the category registry changes: a scan flow that emits events, a retrain flow they trigger.

``scan_categories`` (a scheduled deployment) reads the registry (a category file or a folder of them, see
``icm_core/data/registry.py``), compares each category's fingerprint with the state the previous scan saved
under the artifacts root, and emits one Prefect event per difference:

    icm.category.added / icm.category.changed / icm.category.removed
    resource: {"prefect.resource.id": "icm.category.<name>", ...}
    payload:  {"category", "change", "registry", "root", "fingerprint"}

A deployment trigger in ``prefect.yaml`` turns each event into a run of ``retrain_categories`` with
parameters templated from the payload. That run executes the pipeline on the whole current registry;
because every stage is cached by content, only what the change touches executes: for an added category
its data, fine-tune and task vector; then the generator on all categories, new adapters and their
evaluations. Unchanged categories' fine-tunes, task vectors and base/LoRA evaluations are cache hits. A
removed category drops out of the generator's training set (its old artifacts stay for their readers);
a changed category (new text or description) is fine-tuned again.

Events are emitted before the state is saved: a scan that dies in between emits again next time (the
retrain it triggers is all cache hits), whereas the reverse order could lose a change.

**A new category is served at once, then by the best adapter it can have.** ``<root>/registry-state.json`` records,
per category, the adapter published now, its ``source`` and the earlier ones (``tasks/registry_state.py``):

1. ``selected``: before the pipeline runs, the retrain flow of an ``added`` event (and the lighter
   ``publish_new_category`` deployment) publishes the **selector's** choice (``icm_core/zeroshot/selector.py``):
   the library's own fine-tuned LoRAs (``latest.json["lora_adapters"]``), their mean, a few-step fine-tune started
   from the mean, and, when the current generator's task vectors can be computed from text, its adapters for the
   category's task vector (a few z draws), each scored on the k sample blocks of the category's train split; the
   lowest held-out NLL wins. The candidates' scores are a table artifact (``selector-<category>``).
2. ``fine-tuned``: when the pipeline is done, every category's own fine-tuned LoRA (the best adapter the leave-out
   benchmark knows), replacing the selected one.
3. ``retrained``: the retrained generator's adapter instead, only where ``serving.after_finetune=generator`` (the
   documented setting that chooses storage over quality).

An early (selected) adapter never replaces one trained with the category. Each publication is also a Prefect
artifact (table ``registry-published``, markdown ``published-<category>``).

**The first scan of a registry records it and emits nothing**: on a new checkout the categories are not new, and a
retrain per existing category would be queued for nothing. Train a new registry with ``retrain_categories(...,
baseline=True)`` (or ``icm-lora retrain --baseline``); later scans emit the changes since.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.events import emit_event

from flows.pipeline import icm_pipeline
from flows.publish import publish_fine_tuned, publish_retrained, publish_selected, publish_table
from flows.runtime import confine_deployment_run, device_from_env, thread_task_runner
from icm_core.config import RunConfig
from icm_core.data.registry import diff_registry, load_registry, registry_fingerprints
from tasks.registry_state import STATE_FILE, unpublish, update_state
from tasks.store import normalize_root, read_root_json


EVENT_PREFIX = "icm.category."


def category_resource(name: str, registry: str) -> dict[str, str]:
    """The Prefect resource an event about category ``name`` concerns."""
    return {"prefect.resource.id": f"{EVENT_PREFIX}{name}", "prefect.resource.name": name, "icm.registry": registry}


@flow(name="scan-categories", task_runner=thread_task_runner(), log_prints=True)
def scan_categories(registry: str = "categories", root: str = "artifacts", baseline: bool = False) -> dict[str, Any]:
    """Compare the category registry with the last scan and emit ``icm.category.*`` events for the changes.

    Args:
        registry: A category file or a folder of category files (YAML/JSON, ``categories:`` lists).
        root: Artifacts root (folder or fsspec URL); the scan state is ``<root>/registry-state.json``, one
            entry per registry path.
        baseline: Record the registry as it is without emitting events (after a full pipeline run on it,
            so that only later changes trigger retraining).

    Returns:
        ``{"added": [...], "removed": [...], "changed": [...], "categories": {name: fingerprint}}``.
    """
    logger = get_run_logger()
    confine_deployment_run(root, {"registry": registry})
    registry = str(Path(registry).expanduser().resolve())
    root = normalize_root(root)
    current = registry_fingerprints(load_registry(registry))
    state = read_root_json(root, STATE_FILE) or {}
    first_scan = "categories" not in state.get(registry, {})
    if first_scan and not baseline:
        # A new checkout's categories are not new: record them, queue no retrain per existing category.
        logger.info(
            "first scan of registry %s: its %d categories are recorded as the baseline, no events (train them with "
            "`icm-lora retrain --baseline`; later scans emit the changes since)", registry, len(current),
        )  # fmt: skip
        baseline = True
    previous = state.get(registry, {}).get("categories", {})
    diff = diff_registry(previous, current)
    for change, name in [] if baseline else diff.events():
        emit_event(
            event=f"{EVENT_PREFIX}{change}",
            resource=category_resource(name, registry),
            payload={
                "category": name,
                "change": change,
                "registry": registry,
                "root": root,
                "fingerprint": current.get(name, previous.get(name)),
            },
        )
        logger.info("category %s %s: emitted %s%s", name, change, EVENT_PREFIX, change)
    if baseline:
        logger.info("registry %s recorded as the baseline (%d categories)", registry, len(current))
    elif not diff:
        logger.info("registry %s unchanged (%d categories)", registry, len(current))
    scanned_at = datetime.now(timezone.utc).isoformat()

    def record(fresh: dict[str, Any]) -> None:  # re-read under the lock: keep what the retrain flow published
        fresh[registry] = {**fresh.get(registry, {}), "categories": current, "scanned_at": scanned_at}

    update_state(root, record)
    if baseline:
        return {"added": [], "removed": [], "changed": [], "categories": current, "baseline": True}
    return {"added": diff.added, "removed": diff.removed, "changed": diff.changed, "categories": current}


@flow(
    name="icm-zero-shot-publish",
    task_runner=thread_task_runner(),
    flow_run_name=lambda: "zero-shot-" + _param("category"),
    log_prints=True,
)
def publish_new_category(
    category: str | None = None,
    change: str = "added",
    registry: str = "categories",
    root: str = "artifacts",
    config: RunConfig = RunConfig(),  # noqa: B008 - pydantic default, shown as a form in the UI
) -> dict[str, Any] | None:
    """Serve a newly added category at once: the selector's adapter (no fine-tune of its own; ``publish_selected``).

    The light twin of ``retrain_categories``'s first step, as its own deployment (``zero-shot-on-category-added``,
    CPU pool, no concurrency limit), so the adapter appears seconds after the event even while retrains queue
    behind the retrain deployment's limit of one. Whichever of the two publishes first wins; the other finds the
    same adapter (cached) and publishes nothing; a selected adapter never replaces one trained with the category.

    Args:
        category: The category the event is about (None: nothing to publish).
        change: The event's change; only ``added`` publishes anything.
        registry: The category registry (file or folder).
        root: Artifacts root.
        config: The run config of the retrain deployment (model, data, task vector, sampling): the same values
            make the category's splits and task vector the very outputs the retrain reuses.

    Returns:
        The published entry, or None (nothing to publish; the log says why).
    """
    logger = get_run_logger()
    if category is None:
        logger.info("no category given (the deployment's event names one): nothing to publish")
        return None
    if change != "added":
        logger.info("category %s %s: only an added category gets an early adapter", category, change)
        return None
    confine_deployment_run(root, {"registry": registry}, config=config)
    root = normalize_root(root)
    found = [c for c in load_registry(registry) if c.name == category]
    if not found:
        logger.warning("category %s is not in the registry %s (any more): nothing to publish", category, registry)
        return None
    registry_key = str(Path(registry).expanduser().resolve())
    entry = publish_selected(found[0], registry_key, root, device_from_env(config))
    if entry is not None:
        publish_table(root, registry_key)
    return entry


def _param(name: str) -> str:
    from prefect.runtime import flow_run

    return str(flow_run.parameters.get(name))


def _retrain_run_name() -> str:
    from prefect.runtime import flow_run

    params = flow_run.parameters
    return f"retrain-{params.get('change')}-{params['category']}" if params.get("category") else "retrain-registry"


@flow(name="icm-retrain", task_runner=thread_task_runner(), flow_run_name=_retrain_run_name, log_prints=True)
def retrain_categories(
    category: str | None = None,
    change: str = "added",
    registry: str = "categories",
    root: str = "artifacts",
    config: RunConfig = RunConfig(),  # noqa: B008 - pydantic default, shown as a form in the UI
    baseline: bool = False,
    zero_shot: bool = True,
) -> dict[str, Any]:
    """Bring the generator, adapters and evaluations up to date with the registry after a category change.

    Args:
        category: The category the triggering event is about (for the run's name and log); None for a
            manual retrain on the registry as it is.
        change: ``added``, ``changed`` or ``removed``.
        registry: The category registry (file or folder) to train on: all of its current categories.
        root: Artifacts root (folder or fsspec URL); cached stages of unchanged categories are reused.
        config: All stage configs, as for ``icm_pipeline``. ``model.device`` "auto" takes the worker's
            ``ICM_DEVICE`` if set, else cuda when the machine has it, else cpu; a device the machine lacks
            fails the run at once (never retried).
        baseline: After the run, record the registry as the scan baseline (``scan_categories(baseline=True)``):
            the first retrain of a new registry, so that the next scan emits only later changes.
        zero_shot: For an ``added`` category, first publish the selector's adapter (``publish_selected``), then the
            category's fine-tuned LoRA (or the retrained generator's, ``serving.after_finetune``; module docstring).

    Returns:
        The pipeline's summary, plus ``published`` (``{category: entry}`` from the retrained generator) and
        ``zero_shot`` (the selected entry published before the pipeline, or None).
    """
    logger = get_run_logger()
    if change not in ("added", "changed", "removed"):
        raise ValueError(f"change: expected added, changed or removed, got {change!r}")
    confine_deployment_run(root, {"registry": registry}, config=config)
    categories = load_registry(registry)
    names = [c.name for c in categories]
    present = category in names
    if category is not None and present == (change == "removed"):
        # The registry moved on since the event (e.g. added, then removed again): train on what is there now.
        where = "in" if present else "not in"
        logger.warning("category %s was %s but is %s the registry now", category, change, where)
    cause = f"after {category} {change}" if category else "on request"
    root = normalize_root(root)
    registry_key = str(Path(registry).expanduser().resolve())  # the scan's key for this registry
    early = None
    if zero_shot and change == "added" and present:
        [new] = [c for c in categories if c.name == category]
        try:
            early = publish_selected(new, registry_key, root, device_from_env(config))
        except Exception as exc:  # noqa: BLE001 - serving early is best effort; the retrain must still run
            logger.warning("no early adapter for %s (%s: %s); retraining goes on", category, type(exc).__name__, exc)
        if early is not None:
            publish_table(root, registry_key)
    logger.info("retraining %s: %d categories (%s)", cause, len(names), ", ".join(names))
    summary = icm_pipeline(config=config, categories_file=registry, root=root)
    if change == "removed" and category is not None and not present:
        unpublish(root, registry_key, category)
    cfg = device_from_env(config)
    if cfg.serving.after_finetune == "generator":  # storage over quality: only the generator need be kept
        entries = publish_retrained(summary, registry_key, root)
    else:
        entries = publish_fine_tuned(summary, registry_key, root)
    publish_table(root, registry_key)
    if baseline:
        scan_categories(registry=registry, root=root, baseline=True)
    return {**summary, "published": entries, "zero_shot": early}
