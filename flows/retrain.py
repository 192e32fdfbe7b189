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

import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.events import emit_event

from flows.generate import file_sha256, latest_generator
from flows.pipeline import icm_pipeline
from flows.runtime import device_from_env, thread_task_runner
from icm_core.config import RunConfig
from icm_core.data.categories import Category
from icm_core.data.documents import source_fingerprint
from icm_core.data.registry import diff_registry, load_registry, registry_fingerprints
from icm_core.generator.task_vectors import text_computable
from icm_core.infra.io import read_json, sidecar_path
from icm_core.lora.adapters import adapter_sha256
from icm_core.zeroshot.from_text import generator_vector_settings, plan_text_vector
from tasks.data import prepare_data_task
from tasks.generator import task_vector_task
from tasks.registry_state import STATE_FILE, generator_ref, now, publish_adapter, published, unpublish, update_state
from tasks.result_records import on_root
from tasks.store import normalize_root, read_root_json
from tasks.zeroshot import new_category_selector_task


EVENT_PREFIX = "icm.category."
SELECTED, FINE_TUNED, RETRAINED = "selected", "fine-tuned", "retrained"


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


def _flow_run_id() -> str | None:
    from prefect.runtime import flow_run

    return flow_run.id


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-") or "category"


def published_markdown(category: str, entry: dict[str, Any], previous: dict[str, Any]) -> str:
    """The UI's note on one publication: which adapter serves the category now, and what it replaced."""
    if entry["source"] == SELECTED:
        how = (
            f"the **selector's** choice `{entry['winner']}` ({entry['winner_kind']}) among {entry['candidates']} "
            f"candidates, the lowest NLL on `{category}`'s own samples (table `selector-{_slug(category)}`), without "
            "a fine-tune of its own. It is replaced when the category's fine-tune is done."
        )
    elif entry["source"] == FINE_TUNED:
        how = f"its own **fine-tuned** LoRA (`{entry['adapter_dir']}`)."
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
            "generator": (entry.get("generator_sha256") or "")[:12],
            "published_at": entry["published_at"],
            "adapter_dir": entry["adapter_dir"],
        }
        for name, entry in sorted(published(root, registry).items())
    ]
    if rows:
        create_table_artifact(
            key="registry-published",
            table=rows,
            description="The adapter each category is served by: selected (no fine-tune yet), fine-tuned or retrained",
        )


def publish_selected(category: Category, registry: str, root: str, cfg: RunConfig) -> dict[str, Any] | None:
    """Publish the selector's adapter for a newly added category, before any fine-tune of its own.

    The candidates: the latest pipeline run's per-category LoRAs (``latest.json``), their mean, a fine-tune from the
    mean, and the current generator's draws when its task vectors can be computed from the category's text. The
    category's splits (and task vector) come from the same cached tasks the pipeline runs next. Returns the
    published entry, or None (with a logged reason) when there is no library yet.
    """
    logger = get_run_logger()
    latest = read_root_json(root, "latest.json")
    if latest is None:
        logger.info("no pipeline run under %s yet: no library to choose an adapter for %s from", root, category.name)
        return None
    library = {n: p for n, p in (latest.get("lora_adapters") or {}).items() if n != category.name}
    generator_file = latest_generator(root)
    trained_on = read_json(sidecar_path(generator_file)).get("meta", {}).get("categories", [])
    kind, _ = generator_vector_settings(generator_file)
    use_generator = category.name not in trained_on and text_computable(kind)
    if not use_generator:
        logger.info(
            "%s: the current generator's adapters are no candidates (%s)", category.name,
            "it was trained with the category" if category.name in trained_on else
            f"its task vectors are {kind!r}, which need the category's own fine-tune; task_vector.hidden_from=base "
            "makes them computable from text",
        )  # fmt: skip
    if not library and not use_generator:
        logger.info("%s: no library LoRAs recorded in latest.json and no usable generator: nothing to serve yet",
                    category.name)  # fmt: skip
        return None
    started = time.perf_counter()
    data = on_root(prepare_data_task, root)(category, source_fingerprint(category), cfg.data, root)
    tv_cfg, vector = cfg.task_vector, None
    if use_generator:
        plan = plan_text_vector(generator_file, cfg.model)
        tv_cfg = plan.tv_cfg
        vector = on_root(task_vector_task, root)(category, data, None, plan.model_cfg, cfg.data, plan.tv_cfg, root)
    selected = on_root(new_category_selector_task, root)(
        category.name, data, library, {n: adapter_sha256(p) for n, p in library.items()},
        generator_ref(generator_file) if use_generator else None, vector, cfg.model, tv_cfg, cfg.serving.selector,
        root,
    )  # fmt: skip
    folder = selected.file("adapter")
    scores = selected.meta.get("scores", [])
    entry = {
        "source": SELECTED,
        "adapter_dir": str(folder),
        "adapter_sha256": adapter_sha256(folder),
        "winner": selected.meta.get("winner"),
        "winner_kind": selected.meta.get("winner_kind"),
        "candidates": len(scores),
        "generator": str(generator_file) if use_generator else None,
        "generator_sha256": _generator_sha256(generator_file) if use_generator else None,
        "generator_categories": list(trained_on) if use_generator else [],
        "task_vector_kind": kind if use_generator else None,
        "published_at": now(),
        "flow_run": _flow_run_id(),
    }
    create_table_artifact(
        key=f"selector-{_slug(category.name)}",
        table=_score_rows(scores),
        description=f"{category.name}: held-out NLL (nats a token) of every candidate on its own samples; "
        f"{entry['winner']} chosen",
    )
    if _announce(root, registry, category.name, entry) is None:
        logger.info("%s: already served by this adapter or by one trained with it; nothing to publish", category.name)
        return None
    logger.info(
        "published the selector's adapter for %s in %.1f s: %s (%d candidates): %s",
        category.name, time.perf_counter() - started, entry["winner"], len(scores), folder,
    )  # fmt: skip
    return entry


def _score_rows(scores: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The selector's candidates as table rows (held-out NLL in nats a token, per fold too)."""
    return [
        {"candidate": r["name"], "kind": r["kind"], "held_out_nll": round(r["nll"], 5),
         "chosen": r.get("chosen", False), "per_fold": ", ".join(f"{v:.5f}" for v in r.get("fold_nll", []))}
        for r in scores
    ]  # fmt: skip


def _generator_sha256(generator_file: str | Path) -> str:
    return file_sha256(Path(generator_file))


def publish_retrained(summary: dict[str, Any], registry: str, root: str) -> dict[str, dict[str, Any]]:
    """Publish every category's adapter from the retrained generator (``serving.after_finetune=generator``)."""
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
        if previous.get("source") == SELECTED:
            logger.info("%s: the selected adapter is replaced by the retrained generator's", name)
        entries[name] = entry
    return entries


def publish_fine_tuned(summary: dict[str, Any], registry: str, root: str) -> dict[str, dict[str, Any]]:
    """Publish every category's own fine-tuned LoRA (``summary["lora_adapters"]``), replacing selected ones."""
    entries = {}
    for name, folder in sorted(summary["lora_adapters"].items()):
        entry = {
            "source": FINE_TUNED,
            "adapter_dir": str(folder),
            "adapter_sha256": adapter_sha256(folder),
            "published_at": now(),
            "flow_run": _flow_run_id(),
        }
        previous = _announce(root, registry, name, entry)
        entries[name] = published(root, registry)[name] if previous is None else entry
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
    root = normalize_root(root)
    found = [c for c in load_registry(registry) if c.name == category]
    if not found:
        logger.warning("category %s is not in the registry %s (any more): nothing to publish", category, registry)
        return None
    registry_key = str(Path(registry).expanduser().resolve())
    entry = publish_selected(found[0], registry_key, root, device_from_env(config))
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
        zero_shot: For an ``added`` category, first publish the selector's adapter (``publish_selected``), then the
            category's fine-tuned LoRA (or the retrained generator's, ``serving.after_finetune``; module docstring).

    Returns:
        The pipeline's summary, plus ``published`` (``{category: entry}`` from the retrained generator) and
        ``zero_shot`` (the selected entry published before the pipeline, or None).
    """
    logger = get_run_logger()
    if change not in ("added", "changed", "removed"):
        raise ValueError(f"change: expected added, changed or removed, got {change!r}")
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
            _publish_table(root, registry_key)
    logger.info("retraining %s: %d categories (%s)", cause, len(names), ", ".join(names))
    summary = icm_pipeline(config=config, categories_file=registry, root=root)
    if change == "removed" and category is not None and not present:
        unpublish(root, registry_key, category)
    cfg = device_from_env(config)
    if cfg.serving.after_finetune == "generator":  # storage over quality: only the generator need be kept
        entries = publish_retrained(summary, registry_key, root)
    else:
        entries = publish_fine_tuned(summary, registry_key, root)
    _publish_table(root, registry_key)
    if baseline:
        scan_categories(registry=registry, root=root, baseline=True)
    return {**summary, "published": entries, "zero_shot": early}
