"""Stage output manifests: what makes an output folder complete, and how cheaply that is checked.

Every stage writes its files into its output folder and finishes by writing ``manifest.json``
(atomically, last). The manifest lists each file with its sha256 and, since issue 14, its size and
``mtime_ns`` as they were when it was sealed::

    {"files": {"adapter/adapter_model.safetensors": "<sha256>", ...},
     "stats": {"adapter/adapter_model.safetensors": [<size>, <mtime_ns>], ...},
     "sha256": "<sha256 of the sorted files mapping>", "meta": {...}}

The folder's identity (``sha256``) covers the file hashes only, so the stats can be refreshed (after
a fetch, say) without changing any cache key downstream.

Verifying a folder has two depths:

- **quick** (the default): every listed file must exist with the recorded size and mtime. That is
  O(number of files) ``stat`` calls and reads no data. A file whose size or mtime differs is hashed
  and must still match its sha256 (a ``touch`` is harmless; a changed byte is caught). A file changed
  in place with its size *and* mtime restored by hand is not noticed: that is what the full check is for.
- **full** (``ICM_VERIFY=full``, set by the pipeline's ``--verify`` / ``verify=True``): every file is hashed.

In a warm run (every task a cache hit) each output is checked once, by the cache policy; the task
body, which checks again before building, only runs on a miss. This module is imported by both
``tasks.artifacts`` and ``tasks.store`` and imports neither.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from icm_core.infra.io import ArtifactError, read_json, sha256_file, write_json


logger = logging.getLogger("icm_lora.artifacts")

MANIFEST = "manifest.json"
VERIFY_ENV = "ICM_VERIFY"
"""``full`` (or ``1``/``true``): hash every file of every output that is checked; unset/``quick``: size + mtime."""


def full_verify_requested() -> bool:
    """Whether ``ICM_VERIFY`` asks for full (sha256) verification of every output."""
    return os.environ.get(VERIFY_ENV, "").strip().lower() in ("1", "true", "full", "yes")


def _file_stat(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def manifest_files(folder: Path) -> list[Path]:
    """The files a manifest covers: everything under ``folder`` except the manifest and dot-named files."""
    return [p for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")]


def files_digest(files: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def write_manifest(folder: Path, meta: dict[str, Any]) -> str:
    """Hash every file under ``folder`` (except the manifest) and write the manifest last; return its hash."""
    files, stats = {}, {}
    for path in manifest_files(folder):
        name = path.relative_to(folder).as_posix()
        files[name] = sha256_file(path)
        stats[name] = _file_stat(path)
    digest = files_digest(files)
    write_json(folder / MANIFEST, {"files": files, "stats": stats, "sha256": digest, "meta": meta})
    return digest


def restat_manifest(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Rewrite a fully verified manifest with this machine's file stats (after a fetch); its sha256 is unchanged."""
    stats = {name: _file_stat(folder / name) for name in manifest["files"]}
    updated = {**manifest, "stats": stats}
    write_json(folder / MANIFEST, updated)
    return updated


def verify_manifest(folder: Path, full: bool | None = None) -> dict[str, Any]:
    """Return the manifest if every listed file is present and unchanged; raise ArtifactError naming the bad file.

    ``full`` hashes every file; the default (None) follows ``ICM_VERIFY``. Quick checks compare size and
    mtime with the manifest and hash only files whose stat differs (or manifests written before stats
    were recorded).
    """
    full = full_verify_requested() if full is None else full
    manifest = read_json(folder / MANIFEST)
    stats = manifest.get("stats") or {}
    for name, expected in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            raise ArtifactError(f"{path}: missing")
        if not full and stats.get(name) == _file_stat(path):
            continue
        if sha256_file(path) != expected:
            raise ArtifactError(f"{path}: sha256 mismatch, file is corrupted")
    return manifest


def valid_output(folder: Path, full: bool | None = None) -> dict[str, Any] | None:
    """The manifest of a complete, uncorrupted output folder, or None (depth as in :func:`verify_manifest`)."""
    if not (folder / MANIFEST).is_file():
        return None
    try:
        return verify_manifest(folder, full=full)
    except (ArtifactError, KeyError, json.JSONDecodeError) as exc:
        logger.warning("invalid artifact, will recompute: %s", exc)
        return None
