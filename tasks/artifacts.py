"""Artifact references, cache keys, and the cache policy that ties Prefect's cache to files on disk.

Every stage writes its files into ``<root>/<stage>/<category>/<key>/`` and finishes by writing
``manifest.json`` (atomically, last; ``tasks/manifest.py``). A stage output is *valid* when its manifest
exists and every file still matches. Tasks pass :class:`ArtifactRef` (folder + manifest hash + small
metadata) to each other, never tensors.

:class:`ArtifactCachePolicy` computes the cache key from what determines a stage's output: the stage
name, its config, the hashes of its input artifacts, the artifacts root, the icm_core code, the versions
of torch / transformers / peft, and the *content identity* of every model the stage reads
(``icm_core.models.identity``: a local folder's file fingerprint, a hub id's commit sha, the built-in
model's GGUF sha256 and conversion code). Before Prefect looks the key up, it checks the output's
manifest (stat-only unless ``ICM_VERIFY=full``): if a file is missing or changed, the stale cache record
is dropped through Prefect's own ``ResultStore`` (works for local and remote result storage) so the task
runs again instead of handing out a broken artifact.
"""

from __future__ import annotations

import fcntl
import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from pydantic import BaseModel, ConfigDict

from icm_core.infra.config import config_fingerprint
from icm_core.infra.io import ArtifactError
from icm_core.infra.layout import stage_dir
from icm_core.models import identity as model_identity
from icm_core.models.identity import ModelLoadError
from tasks.fingerprints import (
    REPORT_STAGES,
    code_fingerprint,
    model_identities,
)
from tasks.manifest import (  # noqa: F401 - re-exported: callers import them from here
    MANIFEST,
    full_verify_requested,
    valid_output,
    verify_manifest,
    write_manifest,
)
from tasks.store import fetch, is_remote, local_root, remote_manifest


logger = logging.getLogger("icm_lora.artifacts")


class ArtifactRef(BaseModel):
    """A small, serialisable handle to one stage output folder."""

    model_config = ConfigDict(frozen=True)

    stage: str
    category: str | None = None
    key: str
    path: str
    sha256: str
    meta: dict[str, Any] = {}

    @property
    def folder(self) -> Path:
        return Path(self.path)

    def file(self, name: str) -> Path:
        return Path(self.path) / name


def canonical(value: Any) -> Any:
    """What of a task input goes into a cache key: refs by content hash, configs by their fields."""
    if isinstance(value, ArtifactRef):
        return {"artifact": value.stage, "sha256": value.sha256}
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {str(k): canonical(v) for k, v in sorted(value.items())}
    if isinstance(value, list | tuple):
        return [canonical(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def stage_key(stage: str, inputs: dict[str, Any]) -> str:
    """Cache key of a stage: stage name + canonical inputs + code fingerprint (report stages also hash the
    presentation modules; compute stages do not) + the versions of torch / transformers / peft + the content
    identity of every model the stage reads."""
    code = code_fingerprint(include_presentation=stage in REPORT_STAGES)
    environment = {"libraries": model_identity.library_versions()}
    models = model_identities(inputs, inputs["root"]) if "root" in inputs else {}
    if models:
        environment["models"] = models
    return config_fingerprint(stage, {k: canonical(v) for k, v in sorted(inputs.items())}, code, environment)


def output_dir(root: str | Path, stage: str, key: str, category: str | None) -> Path:
    """This machine's folder for one stage output (for an fsspec root: its local staging folder)."""
    return stage_dir(local_root(root), stage, key, category)


def ref_for(stage: str, category: str | None, key: str, folder: Path, manifest: dict[str, Any]) -> ArtifactRef:
    return ArtifactRef(
        stage=stage, category=category, key=key, path=str(folder), sha256=manifest["sha256"], meta=manifest["meta"]
    )


def localize(ref: ArtifactRef | None, root: str) -> ArtifactRef | None:
    """``ref`` as seen from this machine.

    For a local root that is ``ref`` itself. For an fsspec root the producing task may have run on
    another machine: the output is looked up in this machine's staging folder and fetched (and verified)
    from the root when it is not there yet.

    Raises:
        ArtifactError: The output is neither here nor published, or its content differs from ``ref``.
    """
    if ref is None or not is_remote(root):
        return ref
    folder = output_dir(root, ref.stage, ref.key, ref.category)
    with output_lock(root, folder):
        manifest = valid_output(folder)
        if manifest is None or manifest["sha256"] != ref.sha256:
            if not fetch(root, folder):
                raise ArtifactError(f"{ref.stage} output {folder.name} ({ref.category}): not here and not at {root}")
            manifest = verify_manifest(folder)
    if manifest["sha256"] != ref.sha256:
        raise ArtifactError(f"{folder}: content differs from the reference passed to this task")
    return ref.model_copy(update={"path": str(folder)})


@contextmanager
def output_lock(root: str | Path, folder: Path) -> Iterator[None]:
    """Exclusive lock on one output folder, across threads and processes sharing the artifacts root
    (``flock`` on ``<root>/.locks/<stage>-<category>-<key>.lock``), so concurrent runs never build the
    same output twice or write into each other's half-built folder."""
    root = local_root(root)
    lock_dir = root / ".locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    name = "-".join(folder.resolve().relative_to(root).parts)
    with open(lock_dir / f"{name}.lock", "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def reset_folder(folder: Path) -> None:
    """Remove a partial output left by a crashed run before writing it again."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)


class ArtifactCachePolicy(CachePolicy):
    """Cache key = stage + inputs (refs by hash) + code; invalid artifacts drop their cache record.

    ``category_arg`` names the task parameter that holds the category name (or a Category), so the
    policy can locate the output folder; ``exclude`` lists parameters that do not change the output.
    ``fan_out=(list_arg, item_arg)`` is for a task that builds one output per item of its ``list_arg``
    parameter, each keyed by the task's inputs plus ``item_arg`` = the item (e.g. COND P-DIFF's batched
    sampling): the record is valid only while every item's output is.
    """

    def __init__(
        self,
        stage: str,
        category_arg: str | None = "category",
        exclude: tuple[str, ...] = (),
        fan_out: tuple[str, str] | None = None,
    ):
        super().__init__()
        self.stage = stage
        self.category_arg = category_arg
        self.exclude = exclude
        self.fan_out = fan_out

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs) -> str | None:
        used = {k: v for k, v in inputs.items() if k not in self.exclude}
        try:
            key = stage_key(self.stage, used)
            if self.fan_out is None:
                category = category_name(inputs.get(self.category_arg)) if self.category_arg else None
                ready = output_ready(inputs["root"], self.stage, key, category)
            else:
                list_arg, item_arg = self.fan_out
                ready = all(
                    output_ready(
                        inputs["root"],
                        self.stage,
                        stage_key(self.stage, {**used, item_arg: item}),
                        category_name(item),
                    )
                    for item in inputs[list_arg]
                )
        except ModelLoadError:
            return None  # an unloadable (or unpinnable) model: the task body fails with the same clear error
        if not ready:
            drop_cache_record(task_ctx, key)
        return key


def output_ready(root: str, stage: str, key: str, category: str | None) -> bool:
    """Whether the output of ``stage`` with ``key`` is complete here, or published by another machine at an
    fsspec root (consumers fetch and verify it: :func:`localize`)."""
    folder = output_dir(root, stage, key, category)
    if valid_output(folder) is not None:
        return True
    return is_remote(root) and remote_manifest(root, folder) is not None


def category_name(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else value.name


def drop_cache_record(task_ctx, key: str) -> bool:
    """Invalidate Prefect's result record for ``key`` so a missing or corrupted artifact is recomputed.

    Prefect's ``ResultStore`` has no delete, and its storage blocks (local folder, fsspec, S3, ...) only read
    and write. So the record is *expired* through the store's own API: ``ResultStore.write`` replaces it with
    a record whose ``expiration`` has passed, which ``ResultStore.exists`` (what a transaction asks before
    reusing a result) treats as absent. The task then runs, and its commit writes a fresh record over the
    expired one. This goes through whichever storage the task's result store uses, local or remote.
    Returns whether a record was dropped.
    """
    store = getattr(task_ctx, "result_store", None)
    if store is None:
        return False
    try:
        if not store.exists(key):
            return False
        store.write(obj=None, key=key, expiration=datetime.now(timezone.utc) - timedelta(seconds=1))
    except Exception as exc:  # never let bookkeeping fail a run: the worst case is a stale hit's verification
        logger.warning("could not drop cache record %s: %s", key, exc)
        return False
    logger.warning("dropped cache record %s: its artifact is missing or corrupted", key)
    return True
