"""What the registry publishes for a category, and how the UI shows it (``flows/retrain.py`` calls these).

The three stages of serving a category (``flows/retrain.py``'s docstring): the selector's choice as soon as it is
added (:func:`publish_selected`), then its own fine-tuned LoRA (:func:`publish_fine_tuned`) or, with
``serving.after_finetune=generator``, the retrained generator's adapter (:func:`publish_retrained`). Each
publication goes to ``<root>/registry-state.json`` (``tasks/registry_state.py``) and is a Prefect artifact: a
markdown note ``published-<category>``, the table ``registry-published`` (:func:`publish_table`), and for a selected
adapter the table of its candidates' scores ``selector-<category>``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.generate import file_sha256, latest_generator
from icm_core.config import RunConfig
from icm_core.data.categories import Category
from icm_core.data.documents import source_fingerprint
from icm_core.generator.task_vectors import text_computable
from icm_core.infra.io import read_json, sidecar_path
from icm_core.lora.adapters import adapter_sha256
from icm_core.zeroshot.from_text import generator_vector_settings, plan_text_vector
from tasks.data import prepare_data_task
from tasks.generator import task_vector_task
from tasks.registry_state import generator_ref, now, publish_adapter, published
from tasks.result_records import on_root
from tasks.store import read_root_json
from tasks.zeroshot import new_category_selector_task


SELECTED, FINE_TUNED, RETRAINED = "selected", "fine-tuned", "retrained"


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


def publish_table(root: str, registry: str) -> None:
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
