"""The registry's state under the artifacts root, and what the retrain flow publishes per category.

``<root>/registry-state.json`` holds, per registry path (see ``flows/retrain.py``)::

    {"categories": {name: fingerprint}, "scanned_at": ...,            # written by the scan
     "published": {name: {"source": "selected" | "fine-tuned" | "retrained", "adapter_dir", "adapter_sha256",
                          "generator", "generator_sha256", "generator_categories", "task_vector_kind",
                          "winner", "winner_kind", "candidates",  # selected only
                          "published_at", "flow_run"}},              # written by the retrain flow
     "history": {name: [older "published" entries, newest last]}}

The scan and the retrain flow both rewrite the file; every read-modify-write holds one lock
(``<root>/.locks/registry-state.lock``), so neither loses the other's update.
"""

from __future__ import annotations

import fcntl
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from icm_core.infra.io import ArtifactError
from tasks.artifacts import ArtifactRef, ref_for
from tasks.manifest import valid_output
from tasks.store import local_root, read_root_json, write_root_json


STATE_FILE = "registry-state.json"
EARLY_SOURCES = ("selected", "zero-shot")
"""Sources of an adapter published before the category's own fine-tune."""
HISTORY_LENGTH = 10
"""Earlier publications kept per category."""


@contextmanager
def state_lock(root: str) -> Iterator[None]:
    """Exclusive lock on the registry state of ``root`` (across threads and processes of this machine)."""
    lock_dir = local_root(root) / ".locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / "registry-state.lock", "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def update_state(root: str, change: Callable[[dict[str, Any]], Any]) -> Any:
    """Read the state, let ``change`` edit it in place, write it back (under :func:`state_lock`); returns what
    ``change`` returns."""
    with state_lock(root):
        state = read_root_json(root, STATE_FILE) or {}
        result = change(state)
        write_root_json(root, STATE_FILE, state)
        return result


def now() -> str:
    return datetime.now(timezone.utc).isoformat()


def supersedes(current: dict[str, Any], entry: dict[str, Any], category: str) -> bool:
    """Whether ``entry`` should replace the ``current`` publication of ``category``.

    An early adapter (``selected``, or ``zero-shot`` from before the selector) never replaces one trained with the
    category: its own ``fine-tuned`` LoRA, or a ``retrained`` generator's adapter when the generator was trained
    with it (a late early run must not undo the retrain); the same adapter is not published twice."""
    if not current:
        return True
    if current.get("adapter_sha256") == entry.get("adapter_sha256") and current.get("source") == entry.get("source"):
        return False
    trained = current.get("source") == "fine-tuned" or (
        current.get("source") == "retrained" and category in current.get("generator_categories", [])
    )
    return not (entry.get("source") in EARLY_SOURCES and trained)


def publish_adapter(root: str, registry: str, category: str, entry: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Record ``entry`` as the adapter now published for ``category`` unless the current one stays
    (:func:`supersedes`, decided under the lock); the previous one moves to its history.
    Returns the previous (or current, when kept) entry, empty when there was none, and whether ``entry`` was
    published."""

    def change(state: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        section = state.setdefault(registry, {})
        published = section.setdefault("published", {})
        previous = published.get(category) or {}
        if not supersedes(previous, entry, category):
            return previous, False
        if previous:
            history = section.setdefault("history", {}).setdefault(category, [])
            history.append(previous)
            del history[:-HISTORY_LENGTH]
        published[category] = entry
        return previous, True

    return update_state(root, change)


def unpublish(root: str, registry: str, category: str) -> dict[str, Any]:
    """Drop the published adapter of a removed category (kept in its history); returns it."""

    def change(state: dict[str, Any]) -> dict[str, Any]:
        section = state.setdefault(registry, {})
        previous = section.setdefault("published", {}).pop(category, None) or {}
        if previous:
            section.setdefault("history", {}).setdefault(category, []).append({**previous, "removed_at": now()})
        return previous

    return update_state(root, change)


def published(root: str, registry: str) -> dict[str, dict[str, Any]]:
    """``{category: entry}`` of the adapters published for a registry."""
    return ((read_root_json(root, STATE_FILE) or {}).get(registry) or {}).get("published", {})


def generator_ref(generator_file: str | Path) -> ArtifactRef:
    """The artifact reference of a generator output folder (the pipeline's ``generator/<key>/``), so cached tasks
    can take the generator that ``latest.json`` names.

    Raises:
        ArtifactError: The folder is not a complete, valid generator output.
    """
    folder = Path(generator_file).parent
    manifest = valid_output(folder)
    if manifest is None:
        raise ArtifactError(f"{folder}: not a complete generator output (no valid manifest)")
    return ref_for("generator", None, folder.name, folder, manifest)
