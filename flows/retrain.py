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

**A new category is served at once.** Before the pipeline runs, the retrain flow of an ``added`` event publishes a
**zero-shot** adapter for the new category: the current generator (``latest.json``) decodes it from the category's
task vector computed from its text alone (Eq. 1 on the base model, or its description embedding), seconds after
the event, long before its fine-tune finishes. That needs a generator whose task-vector kind a text gives
(``task_vector.hidden_from=base`` or ``task_vector.source=description``); with the default fine-tuned-model
vectors the step is skipped and says why. When the pipeline is done, every category's adapter from the retrained
generator is published, replacing the zero-shot one. ``<root>/registry-state.json`` records, per category, the
adapter published now, whether it is ``zero-shot`` or ``retrained``, and the earlier ones
(``tasks/registry_state.py``); each publication is also a Prefect artifact (table ``registry-published``,
markdown ``published-<category>``).
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.events import emit_event

from flows.generate import file_sha256, latest_generator
from flows.pipeline import icm_pipeline
from flows.runtime import confine_deployment_run, device_from_env, thread_task_runner
from icm_core.config import RunConfig
from icm_core.data.categories import Category
from icm_core.data.documents import source_fingerprint
from icm_core.data.registry import diff_registry, load_registry, registry_fingerprints
from icm_core.generator.task_vectors import TaskVectorKindError, text_computable
from icm_core.infra.io import read_json, sidecar_path
from icm_core.lora.adapters import adapter_sha256
from icm_core.zeroshot.from_text import generator_vector_settings, plan_text_vector
from tasks.data import prepare_data_task
from tasks.generator import task_vector_task
from tasks.registry_state import STATE_FILE, generator_ref, now, publish_adapter, published, unpublish, update_state
from tasks.result_records import on_root
from tasks.store import normalize_root, read_root_json
from tasks.zeroshot import vector_adapter_task


EVENT_PREFIX = "icm.category."
ZERO_SHOT, RETRAINED = "zero-shot", "retrained"


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
    return {"added": diff.added, "removed": diff.removed, "changed": diff.changed, "categories": current}


def _flow_run_id() -> str | None:
    from prefect.runtime import flow_run

    return flow_run.id


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-") or "category"


def published_markdown(category: str, entry: dict[str, Any], previous: dict[str, Any]) -> str:
    """The UI's note on one publication: which adapter serves the category now, and what it replaced."""
    if entry["source"] == ZERO_SHOT:
        how = (
            f"a **zero-shot** adapter: generator `{entry['generator_sha256'][:12]}` (trained on "
            f"{', '.join(entry['generator_categories']) or 'no recorded categories'}, not on `{category}`) decoded it "
            f"from the task vector of `{category}`'s text ({entry['task_vector_kind']}), without a fine-tune. It is "
            "replaced when the retrained generator is ready."
        )
    else:
        trained = entry["generator_sha256"][:12]
        how = f"the adapter of the **retrained** generator `{trained}` (trained with `{category}`)."
    replaced = f"\n\nIt replaces the {previous['source']} adapter `{previous['adapter_dir']}`." if previous else ""
    return (
        f"# Published adapter: {category}\n\n"
        f"Since {entry['published_at']}, `{category}` is served by {how}\n\n"
        f"Folder (on the machine that ran the flow): `{entry['adapter_dir']}`; adapter sha256 "
        f"`{entry['adapter_sha256'][:16]}`.{replaced}\n"
    )


def _announce(root: str, registry: str, category: str, entry: dict[str, Any]) -> dict[str, Any] | None:
    """Record a publication in the registry state and as Prefect artifacts; returns the entry it replaced (empty
    when none), or None when the current publication stays (see ``tasks.registry_state.supersedes``)."""
    previous, done = publish_adapter(root, registry, category, entry)
    if not done:
        return None
    create_markdown_artifact(
        key=f"published-{_slug(category)}",
        markdown=published_markdown(category, entry, previous),
        description=f"{category}: {entry['source']} adapter published",
    )
    return previous


def _publish_table(root: str, registry: str) -> None:
    rows = [
        {
            "category": name,
            "source": entry["source"],
            "generator": entry["generator_sha256"][:12],
            "published_at": entry["published_at"],
            "adapter_dir": entry["adapter_dir"],
        }
        for name, entry in sorted(published(root, registry).items())
    ]
    if rows:
        create_table_artifact(
            key="registry-published",
            table=rows,
            description="The adapter each category is served by: zero-shot (no fine-tune yet) or retrained",
        )


def publish_zero_shot(category: Category, registry: str, root: str, cfg: RunConfig) -> dict[str, Any] | None:
    """Publish an adapter for a newly added category from the current generator, before any fine-tune.

    The category's splits and task vector come from the same cached tasks the pipeline runs next (so it reuses
    them); the vector is computed the way the generator's were, from the category's text (or description) alone.
    Returns the published entry, or None (with a logged reason) when there is no generator yet, or its vectors
    need a fine-tune.
    """
    logger = get_run_logger()
    try:
        generator_file = latest_generator(root)
    except FileNotFoundError:
        logger.info("no generator under %s yet: no zero-shot adapter for %s", root, category.name)
        return None
    trained_on = read_json(sidecar_path(generator_file)).get("meta", {}).get("categories", [])
    if category.name in trained_on:
        logger.info("the current generator was trained with %s: no zero-shot adapter needed", category.name)
        return None
    kind, _ = generator_vector_settings(generator_file)
    if not text_computable(kind):
        logger.warning(
            "no zero-shot adapter for %s: the current generator's task vectors are %r, which need the category's "
            "own fine-tune; train with task_vector.hidden_from=base (or source=description) to serve new "
            "categories before their fine-tune",
            category.name,
            kind,
        )
        return None
    try:
        plan = plan_text_vector(generator_file, cfg.model)
    except TaskVectorKindError as exc:  # pragma: no cover - text_computable above
        logger.warning("no zero-shot adapter for %s: %s", category.name, exc)
        return None
    started = time.perf_counter()
    generator = generator_ref(generator_file)
    data = on_root(prepare_data_task, root)(category, source_fingerprint(category), cfg.data, root)
    vector = on_root(task_vector_task, root)(category, data, None, plan.model_cfg, cfg.data, plan.tv_cfg, root)
    adapter = on_root(vector_adapter_task, root)(category.name, "zero_shot", generator, [vector], cfg.sample, root)
    folder = adapter.file("adapter")
    entry = {
        "source": ZERO_SHOT,
        "adapter_dir": str(folder),
        "adapter_sha256": adapter_sha256(folder),
        "generator": str(generator_file),
        "generator_sha256": _generator_sha256(generator_file),
        "generator_categories": list(adapter.meta.get("generator_categories", [])),
        "task_vector_kind": kind,
        "published_at": now(),
        "flow_run": _flow_run_id(),
    }
    if _announce(root, registry, category.name, entry) is None:
        logger.info(
            "%s: already served by this adapter or by a generator trained on it; nothing to publish", category.name
        )
        return None
    logger.info(
        "published a zero-shot adapter for %s in %.1f s (generator %s): %s",
        category.name, time.perf_counter() - started, entry["generator_sha256"][:12], folder,
    )  # fmt: skip
    return entry


def _generator_sha256(generator_file: str | Path) -> str:
    return file_sha256(Path(generator_file))


def publish_retrained(summary: dict[str, Any], registry: str, root: str) -> dict[str, dict[str, Any]]:
    """Publish every category's adapter from the retrained generator (replacing zero-shot ones)."""
    logger = get_run_logger()
    generator_file = summary["generator"]
    generator_sha = _generator_sha256(generator_file)
    kind, _ = generator_vector_settings(generator_file)
    names = [row["category"] for row in summary["rows"]]
    entries = {}
    for row in summary["rows"]:
        name, folder = row["category"], row["adapter_dir"]
        entry = {
            "source": RETRAINED,
            "adapter_dir": str(folder),
            "adapter_sha256": adapter_sha256(folder),
            "generator": str(generator_file),
            "generator_sha256": generator_sha,
            "generator_categories": names,
            "task_vector_kind": kind,
            "published_at": now(),
            "flow_run": _flow_run_id(),
        }
        previous = _announce(root, registry, name, entry)
        if previous is None:  # the same adapter again (nothing changed for it): not a new publication
            entries[name] = published(root, registry)[name]
            continue
        if previous.get("source") == ZERO_SHOT:
            logger.info("%s: the zero-shot adapter is replaced by the retrained generator's", name)
        entries[name] = entry
    return entries


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
    """Serve a newly added category at once: its zero-shot adapter from the current generator (no fine-tune).

    The light twin of ``retrain_categories``'s first step, as its own deployment (``zero-shot-on-category-added``,
    CPU pool, no concurrency limit), so the adapter appears seconds after the event even while retrains queue
    behind the retrain deployment's limit of one. Whichever of the two publishes first wins; the other finds the
    same adapter (cached) and publishes nothing; a zero-shot adapter never replaces one from a generator trained
    with the category.

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
        logger.info("category %s %s: only an added category gets a zero-shot adapter", category, change)
        return None
    confine_deployment_run(root, {"registry": registry}, config=config)
    root = normalize_root(root)
    found = [c for c in load_registry(registry) if c.name == category]
    if not found:
        logger.warning("category %s is not in the registry %s (any more): nothing to publish", category, registry)
        return None
    registry_key = str(Path(registry).expanduser().resolve())
    entry = publish_zero_shot(found[0], registry_key, root, device_from_env(config))
    if entry is not None:
        _publish_table(root, registry_key)
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
        zero_shot: For an ``added`` category, first publish a zero-shot adapter from the current generator (when
            its task-vector kind can be computed from text), then the retrained one (see the module docstring).

    Returns:
        The pipeline's summary, plus ``published`` (``{category: entry}`` from the retrained generator) and
        ``zero_shot`` (the zero-shot entry published before the pipeline, or None).
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
            early = publish_zero_shot(new, registry_key, root, device_from_env(config))
        except Exception as exc:  # noqa: BLE001 - serving early is best effort; the retrain must still run
            logger.warning(
                "no zero-shot adapter for %s (%s: %s); retraining goes on", category, type(exc).__name__, exc
            )
        if early is not None:
            _publish_table(root, registry_key)
    logger.info("retraining %s: %d categories (%s)", cause, len(names), ", ".join(names))
    summary = icm_pipeline(config=config, categories_file=registry, root=root)
    if change == "removed" and category is not None and not present:
        unpublish(root, registry_key, category)
    entries = publish_retrained(summary, registry_key, root)
    _publish_table(root, registry_key)
    if baseline:
        scan_categories(registry=registry, root=root, baseline=True)
    return {**summary, "published": entries, "zero_shot": early}
