"""Artifact references, manifests and the cache policy that ties Prefect's cache to files on disk.

Every stage writes its files into ``<root>/<stage>/<category>/<key>/`` and finishes by writing
``manifest.json`` (atomically, last) with the sha256 of each file. A stage output is *valid* when
its manifest exists and every file still matches. Tasks pass :class:`ArtifactRef` (folder + manifest
hash + small metadata) to each other, never tensors.

:class:`ArtifactCachePolicy` computes the cache key from what determines a stage's output (the stage
name, its config, the hashes of its input artifacts, the artifacts root, and the icm_core code) and,
before Prefect looks the key up, checks the output's manifest: if a file is missing or corrupted,
the stale cache record is dropped so the task runs again instead of handing out a broken artifact.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from pydantic import BaseModel, ConfigDict

import icm_core
from icm_core.config import config_fingerprint
from icm_core.io import ArtifactError, read_json, sha256_file, write_json
from icm_core.layout import stage_dir
from tasks.store import fetch, is_remote, local_root


logger = logging.getLogger("icm_lora.artifacts")

MANIFEST = "manifest.json"


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


PRESENTATION_MODULES = frozenset(
    {
        "icm_core/reporting.py",
        "icm_core/plots.py",
        "tasks/report.py",
        "tasks/ablations.py",
        "icm_core/zeroshot_report.py",
        "tasks/zeroshot_report.py",
    }
)
"""Modules that only format results (tables, figures, UI artifacts). Editing them re-renders reports but
must not retrain anything, so they are left out of the fingerprint of the compute stages. No other
module may import them (``tests/test_layering.py`` checks)."""

REPORT_STAGES = frozenset({"report", "ablation_report"})


@cache
def code_fingerprint(include_presentation: bool = True) -> str:
    """sha256 over icm_core's version and the source of icm_core and tasks: editing the method or a task
    wrapper invalidates cached stages (Prefect's TASK_SOURCE would only see the task function itself).

    With ``include_presentation=False`` the result-formatting modules are left out: that is the
    fingerprint of every compute stage, so a change to a table or a figure reruns only the reports.
    """
    digest = hashlib.sha256(icm_core.__version__.encode())
    for package in (Path(icm_core.__file__).parent, Path(__file__).parent):
        for path in sorted(package.rglob("*.py")):
            name = f"{package.name}/{path.relative_to(package).as_posix()}"
            if not include_presentation and name in PRESENTATION_MODULES:
                continue
            digest.update(name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


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
    presentation modules; compute stages do not)."""
    code = code_fingerprint(include_presentation=stage in REPORT_STAGES)
    return config_fingerprint(stage, {k: canonical(v) for k, v in sorted(inputs.items())}, code)


def output_dir(root: str | Path, stage: str, key: str, category: str | None) -> Path:
    """This machine's folder for one stage output (for an fsspec root: its local staging folder)."""
    return stage_dir(local_root(root), stage, key, category)


def write_manifest(folder: Path, meta: dict[str, Any]) -> str:
    """Hash every file under ``folder`` (except the manifest) and write the manifest last; return its hash."""
    files = {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")
    }
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    write_json(folder / MANIFEST, {"files": files, "sha256": digest, "meta": meta})
    return digest


def verify_manifest(folder: Path) -> dict[str, Any]:
    """Return the manifest if every listed file exists and matches; raise ArtifactError naming the bad file."""
    manifest = read_json(folder / MANIFEST)
    for name, expected in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            raise ArtifactError(f"{path}: missing")
        if sha256_file(path) != expected:
            raise ArtifactError(f"{path}: sha256 mismatch, file is corrupted")
    return manifest


def valid_output(folder: Path) -> dict[str, Any] | None:
    """The manifest of a complete, uncorrupted output folder, or None."""
    if not (folder / MANIFEST).is_file():
        return None
    try:
        return verify_manifest(folder)
    except (ArtifactError, KeyError, json.JSONDecodeError) as exc:
        logger.warning("invalid artifact, will recompute: %s", exc)
        return None


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
    """

    def __init__(self, stage: str, category_arg: str | None = "category", exclude: tuple[str, ...] = ()):
        super().__init__()
        self.stage = stage
        self.category_arg = category_arg
        self.exclude = exclude

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs) -> str | None:
        used = {k: v for k, v in inputs.items() if k not in self.exclude}
        key = stage_key(self.stage, used)
        category = category_name(inputs.get(self.category_arg)) if self.category_arg else None
        folder = output_dir(inputs["root"], self.stage, key, category)
        if valid_output(folder) is None:
            drop_cache_record(task_ctx, key)
        return key


def category_name(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else value.name


def drop_cache_record(task_ctx, key: str) -> None:
    """Delete Prefect's result record for ``key`` so a missing or corrupted artifact is recomputed."""
    store = getattr(task_ctx, "result_store", None)
    for storage in (getattr(store, "metadata_storage", None), getattr(store, "result_storage", None)):
        basepath = getattr(storage, "basepath", None)
        if basepath:
            record = Path(basepath).expanduser() / key
            if record.is_file():
                record.unlink()
                logger.warning("dropped cache record %s: its artifact is missing or corrupted", key)
