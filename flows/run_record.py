"""An unchanged pipeline run answers at once: the record of a finished run, found by its run key.

A pipeline run whose every stage is a cache hit still costs a temporary Prefect server, one task run per stage
and a cache lookup each (37 s for the demo's 78 stages on 2 cores). When nothing that any stage key depends on
has changed, that work can only reproduce the last summary, so the CLI looks the summary up first.

The **run key** hashes what the stage keys hash, and what composes them:

* the run config, as the flow sees it (``model.device`` after ``$ICM_DEVICE``);
* the categories (name, source, description) and each source's fingerprint (file bytes for user text, package
  versions for built-in text), and ``--only``;
* the artifacts root;
* the source of ``icm_core``, ``tasks`` (the stages' code fingerprint, presentation modules included) and
  ``flows`` (how the stages are composed);
* the versions of torch / transformers / peft and the content identity of the models the run reads.

A record (``<root>/runs/<run key>.json``) is written after a run completes and holds its summary and the output
folders the summary points to (report, generator, adapters). It is used only while each of those folders is
still complete and unchanged (manifest check: sizes and mtimes, or every hash with ``--verify``, which also
always runs the flow). ``icm-lora pipeline --rerun`` runs the flow anyway (every stage then shows as cached in
the Prefect UI). An fsspec root has no records: its runs always go through Prefect.

No Prefect import here, so a hit costs the interpreter, torch's import and the hashing, not a server.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from icm_core.config import RunConfig
from icm_core.data.categories import Category
from icm_core.data.documents import source_fingerprint
from icm_core.infra.io import ArtifactError, read_json, write_json
from icm_core.models.identity import ModelLoadError, library_versions
from tasks.fingerprints import code_fingerprint, hash_sources, model_identities
from tasks.manifest import valid_output
from tasks.store import is_remote, local_root


RECORDS = "runs"
"""Folder under the artifacts root holding one JSON record per finished run key."""

FLOWS_DIR = Path(__file__).parent


def flows_fingerprint() -> str:
    """sha256 over the source of the ``flows`` package (the composition of the stages)."""
    digest = hashlib.sha256()
    hash_sources(digest, FLOWS_DIR)
    return digest.hexdigest()


def run_key(cfg: RunConfig, categories: Sequence[Category], only: Sequence[str] | None, root: str) -> str | None:
    """The key of a pipeline run: equal keys mean every stage of the run has the same cache key. None when a model
    the run reads cannot be identified (unloadable): the flow then runs and fails on it with its own error."""
    try:
        models = model_identities({"model": cfg.model, "task_vector": cfg.task_vector}, root)
    except ModelLoadError:
        return None
    payload = {
        "config": cfg.model_dump(mode="json"),
        "categories": [{**c.model_dump(mode="json"), "fingerprint": source_fingerprint(c)} for c in categories],
        "only": list(only) if only else None,
        "root": str(root),
        "code": code_fingerprint(include_presentation=True),
        "flows": flows_fingerprint(),
        "libraries": library_versions(),
        "models": models,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def record_path(root: str, key: str) -> Path:
    return local_root(root) / RECORDS / f"{key}.json"


def output_folders(summary: dict[str, Any]) -> list[str]:
    """The output folders a summary points to: the report, the generator and every generated adapter."""
    folders = [summary["report_dir"], str(Path(summary["generator"]).parent)]
    folders += [str(Path(row["adapter_dir"]).parent) for row in summary["rows"]]
    return folders


def find(root: str, key: str | None) -> dict[str, Any] | None:
    """The summary recorded for ``key``, or None: no record, an unreadable one, or an output folder it points
    to that is no longer complete (the run must then go through Prefect, which rebuilds what is missing)."""
    if key is None or is_remote(root):
        return None
    path = record_path(root, key)
    try:
        record = read_json(path)
        summary, folders = record["summary"], record["folders"]
    except (ArtifactError, OSError, KeyError, TypeError):
        return None  # no record yet, or one this version cannot read: run the flow
    if any(valid_output(Path(folder)) is None for folder in folders):
        return None
    return summary


def write(root: str, key: str | None, summary: dict[str, Any]) -> Path | None:
    """Record a finished run's summary under its key (atomically); nothing for an fsspec root or no key."""
    if key is None or is_remote(root):
        return None
    return write_json(record_path(root, key), {"key": key, "summary": summary, "folders": output_folders(summary)})
