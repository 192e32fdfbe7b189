"""Prefect's result records live inside the artifacts root they describe.

A task's result record (what makes it a cache hit) names an output folder of one artifacts root. Kept in
one global place (``./artifacts/.prefect/results`` from ``prefect.toml``), two roots would share one
record store: deleting a root would leave records behind that point into nothing, and two roots whose
keys met would see each other's records. So each flow binds its tasks to the root's own store:

- a local root ``R``: ``R/.prefect/results`` (a folder; Prefect writes a ``LocalFileSystem`` there);
- an fsspec root ``proto://bucket/R``: ``proto://bucket/R/.prefect/results``, through a Prefect
  ``RemoteFileSystem`` block saved on the server as ``icm-records-<sha256(root)[:12]>`` (Prefect only accepts
  saved blocks as task result storage). Every machine that runs tasks for the root then shares its records.

:func:`on_root` returns a task bound that way (``task.with_options(result_storage=...)``), leaving the
task's cache policy and everything else as it is. Deleting a root deletes its cache with it.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any

from tasks.store import is_remote, local_root, normalize_root


RECORDS = (".prefect", "results")

_saved_blocks: dict[tuple[str, str], str] = {}
_saved_lock = threading.Lock()


def records_location(root: str | Path) -> str:
    """Where the result records of ``root`` live: a local folder, or a URL inside the fsspec root."""
    if is_remote(root):
        return f"{normalize_root(root)}/{'/'.join(RECORDS)}"
    return str(local_root(root).joinpath(*RECORDS))


def record_storage(root: str | Path) -> Path | str:
    """The ``result_storage`` for tasks writing into ``root``: a ``Path`` for a local root, the slug of a saved
    ``RemoteFileSystem`` block for an fsspec root (saved once per process and API)."""
    if not is_remote(root):
        return Path(records_location(root))
    from prefect.filesystems import RemoteFileSystem
    from prefect.settings import PREFECT_API_URL

    location = records_location(root)
    name = "icm-records-" + hashlib.sha256(location.encode()).hexdigest()[:12]
    cache_key = (str(PREFECT_API_URL.value()), location)
    with _saved_lock:
        if cache_key not in _saved_blocks:
            RemoteFileSystem(basepath=location).save(name, overwrite=True)
            _saved_blocks[cache_key] = f"remote-file-system/{name}"
        return _saved_blocks[cache_key]


def on_root(task: Any, root: str | Path) -> Any:
    """``task`` with its result records stored inside ``root`` (see the module docstring)."""
    return task.with_options(result_storage=record_storage(root))
