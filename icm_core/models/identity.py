"""What a model *is*, by content, for cache keys: a changed model must never be a stale cache hit.

A model is named by a string (``name_or_path``); the string alone does not say what was loaded. This
module turns it into an identity that changes whenever the weights a stage reads change:

* a **local folder**: the size and sha256 of every file in it (weights, config, tokenizer). Hashing a
  multi-gigabyte folder on every run would make warm runs slow, so each file's hash is recorded once in
  a small *fingerprint record* (JSON, ``<record_dir>/<sha256(path)[:16]>.json``) together with its size
  and ``mtime_ns``; later calls re-hash only files whose size or mtime changed (or that are new), and
  ``full=True`` re-hashes everything (the pipeline's ``--verify``). A file rewritten in place with its
  size and mtime restored by hand is only noticed by a full check;
* a **Hugging Face hub id**: the commit sha of the revision (default ``main``), read from the local
  Hugging Face cache (``refs/<revision>`` with its ``snapshots/<sha>`` folder present). A moved ``main``
  is a new identity once the cache has fetched it. When the cache does not hold the repo and the hub is
  reachable (``HF_HUB_OFFLINE`` unset), ``huggingface_hub.model_info`` gives the sha; otherwise a
  :class:`ModelLoadError` says so: an unpinned model is never keyed by name alone;
* a **built-in alias** (``smollm2-135m``): the sha256 of the GGUF file in its package (fingerprint
  record as above) plus the sha256 of the conversion code (``icm_core.models.base_model`` passes the source of its
  ``convert_gguf``), which also names the converted folder, so a changed conversion converts again.

This module imports nothing else of icm_core but ``io``; ``base_model`` uses it (and re-exports
:class:`ModelLoadError`).

:func:`library_versions` lists the versions of torch, transformers and peft: they change numbers
(kernels, initialisation, GGUF dequantisation), so the pipeline puts them in every stage's key and an
upgrade recomputes (docs/reliability.md).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import threading
from pathlib import Path
from typing import Any

from icm_core.infra.io import read_json, sha256_file, write_json


LIBRARIES = ("torch", "transformers", "peft")
"""Libraries whose version is part of every cache key: an upgrade may change numbers."""

_records_lock = threading.Lock()


class ModelLoadError(RuntimeError):
    """The model id or path cannot be loaded (or pinned); the message names it."""


def library_versions() -> dict[str, str]:
    """``{"torch": "2.13.0", ...}`` of the installed numeric libraries ("missing" when one is absent)."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "missing"
    return versions


def _record_path(record_dir: Path, target: Path) -> Path:
    return Path(record_dir) / f"{hashlib.sha256(str(target).encode()).hexdigest()[:16]}.json"


def _listing(target: Path) -> list[tuple[str, Path]]:
    """The files that make up a model: one file, or every non-hidden file under a folder (symlinks followed,
    as in a Hugging Face cache snapshot)."""
    if target.is_file():
        return [(target.name, target)]
    files = []
    for path in sorted(target.rglob("*")):
        relative = path.relative_to(target)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        files.append((relative.as_posix(), path))
    return files


def file_fingerprint(target: str | Path, record_dir: str | Path, full: bool = False) -> dict[str, str]:
    """``{relative name: sha256}`` of a file or of every file in a folder, through the fingerprint record.

    A file is hashed when it is not in the record, when its size or ``mtime_ns`` differs from the record,
    or always with ``full``; the record is then rewritten (atomically). Unchanged files cost one ``stat``.
    """
    target = Path(target).expanduser().resolve()
    record_file = _record_path(Path(record_dir), target)
    with _records_lock:
        record: dict[str, Any] = {}
        if record_file.is_file():
            try:
                loaded = read_json(record_file)
                if loaded.get("path") == str(target):
                    record = loaded.get("files", {})
            except Exception:  # a damaged record is rebuilt, never trusted
                record = {}
        files, changed = {}, False
        for name, path in _listing(target):
            st = path.stat()
            known = record.get(name)
            if not full and known and known["size"] == st.st_size and known["mtime_ns"] == st.st_mtime_ns:
                files[name] = known
                continue
            files[name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_file(path)}
            changed = changed or files[name] != known
        if changed or set(files) != set(record):
            write_json(record_file, {"path": str(target), "files": files})
    return {name: entry["sha256"] for name, entry in files.items()}


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def hub_cache_folder(repo_id: str) -> Path:
    from huggingface_hub.constants import HF_HUB_CACHE

    return Path(HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))


def hub_revision(repo_id: str, revision: str = "main") -> str:
    """The commit sha that ``repo_id@revision`` resolves to, from the local HF cache or (online) the hub.

    Raises:
        ModelLoadError: Neither the cache nor the hub can say; the message names the model and what to do.
    """
    folder = hub_cache_folder(repo_id)
    ref = folder / "refs" / revision
    if ref.is_file():
        sha = ref.read_text(encoding="utf-8").strip()
        if (folder / "snapshots" / sha).is_dir():
            return sha
    if re.fullmatch(r"[0-9a-f]{40}", revision) and (folder / "snapshots" / revision).is_dir():
        return revision
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    reason = f"not in the local Hugging Face cache ({folder})"
    if not offline:
        try:
            from huggingface_hub import model_info

            return model_info(repo_id, revision=revision).sha
        except Exception as exc:  # no network, no such repo, gated: all mean "cannot pin it"
            reason += f", and the hub did not answer ({type(exc).__name__}: {exc})"
    else:
        reason += ", and HF_HUB_OFFLINE is set"
    raise ModelLoadError(
        f"model {repo_id!r}: cannot load: not a local folder, and its hub revision cannot be resolved: {reason}. "
        "Download it first (huggingface-cli download) or give a local folder"
    )


def hub_snapshot(repo_id: str, revision: str = "main") -> Path | None:
    """The local snapshot folder of ``repo_id@revision`` when the HF cache holds it, else None."""
    folder = hub_cache_folder(repo_id)
    ref = folder / "refs" / revision
    sha = ref.read_text(encoding="utf-8").strip() if ref.is_file() else revision
    snapshot = folder / "snapshots" / sha
    return snapshot if snapshot.is_dir() else None


def builtin_identity(
    gguf_path: Path, conversion_sha256: str, record_dir: str | Path, full: bool = False
) -> dict[str, str]:
    """Identity of a built-in GGUF model: the GGUF's sha256 and the conversion code's sha256."""
    [gguf_sha] = file_fingerprint(gguf_path, record_dir, full).values()
    return {"kind": "builtin-gguf", "gguf": gguf_path.name, "gguf_sha256": gguf_sha, "conversion": conversion_sha256}


def path_or_hub_identity(name_or_path: str, record_dir: str | Path, full: bool = False) -> dict[str, Any]:
    """Identity of a local file/folder (content fingerprint) or, when no such path exists, of a hub id."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        files = file_fingerprint(path, record_dir, full)
        return {"kind": "local", "sha256": digest(files), "files": len(files)}
    return {"kind": "hub", "repo": name_or_path, "revision": hub_revision(name_or_path)}
