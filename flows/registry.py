"""Retraining when the category registry changes: a scan flow that emits events, a retrain flow they trigger.

``scan_categories`` (a scheduled deployment) reads the registry (a category file or a folder of them, see
``icm_core/registry.py``), compares each category's fingerprint with the state the previous scan saved
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
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.events import emit_event

from flows.pipeline import icm_pipeline
from icm_core.config import RunConfig
from icm_core.registry import diff_registry, load_registry, registry_fingerprints
from tasks.store import normalize_root, read_root_json, write_root_json


STATE_FILE = "registry-state.json"
EVENT_PREFIX = "icm.category."


def category_resource(name: str, registry: str) -> dict[str, str]:
    """The Prefect resource an event about category ``name`` concerns."""
    return {"prefect.resource.id": f"{EVENT_PREFIX}{name}", "prefect.resource.name": name, "icm.registry": registry}


@flow(name="scan-categories", log_prints=True)
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
    registry = str(Path(registry).expanduser().resolve())
    root = normalize_root(root)
    current = registry_fingerprints(load_registry(registry))
    state = read_root_json(root, STATE_FILE) or {}
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
    state[registry] = {"categories": current, "scanned_at": scanned_at}
    write_root_json(root, STATE_FILE, state)
    return {"added": diff.added, "removed": diff.removed, "changed": diff.changed, "categories": current}


def _retrain_run_name() -> str:
    from prefect.runtime import flow_run

    params = flow_run.parameters
    return f"retrain-{params.get('change')}-{params['category']}" if params.get("category") else "retrain-registry"


@flow(name="icm-retrain", flow_run_name=_retrain_run_name, log_prints=True)
def retrain_categories(
    category: str | None = None,
    change: str = "added",
    registry: str = "categories",
    root: str = "artifacts",
    config: RunConfig = RunConfig(),  # noqa: B008 - pydantic default, shown as a form in the UI
    baseline: bool = False,
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
    """
    logger = get_run_logger()
    if change not in ("added", "changed", "removed"):
        raise ValueError(f"change: expected added, changed or removed, got {change!r}")
    names = [c.name for c in load_registry(registry)]
    present = category in names
    if category is not None and present == (change == "removed"):
        # The registry moved on since the event (e.g. added, then removed again): train on what is there now.
        where = "in" if present else "not in"
        logger.warning("category %s was %s but is %s the registry now", category, change, where)
    cause = f"after {category} {change}" if category else "on request"
    logger.info("retraining %s: %d categories (%s)", cause, len(names), ", ".join(names))
    summary = icm_pipeline(config=config, categories_file=registry, root=root)
    if baseline:
        scan_categories(registry=registry, root=root, baseline=True)
    return summary


if __name__ == "__main__":
    # ``python -m flows.registry``: an alias of ``icm-lora registry scan`` (flows/cli.py). Run this way the
    # module is ``__main__``, so importing flows.cli here makes no import cycle.
    from flows.cli import alias

    raise SystemExit(alias("registry scan"))
