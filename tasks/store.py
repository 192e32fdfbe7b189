"""Artifacts roots that are fsspec URLs: stages build locally, then publish to the shared root.

The artifacts root is a local folder by default. It may also be any fsspec URL (``s3://bucket/icm``,
``gcs://...``, ``file:///mnt/shared/icm``, ``memory://icm`` in tests), so task runs on several machines
share one store. Such a *remote* root is used through a local staging cache on each machine:

- every stage output has the same relative place in both: ``<stage>/<category>/<key16>/``;
- a stage builds into its local staging folder (exactly as for a local root), writes its manifest, then
  :func:`publish` uploads the files and the manifest **last**: on the remote side a folder without
  ``manifest.json`` is never read, so a half-uploaded output is invisible (object stores have no atomic
  folder rename; the manifest is the commit marker);
- when the local staging folder has no valid output, :func:`fetch` downloads the remote one into a
  temporary folder, verifies every file against the manifest's sha256, and only then renames it into
  place. A second machine (or a wiped local cache) therefore reuses remote outputs without recomputing;
- an :class:`~tasks.artifacts.ArtifactRef` carries the producing machine's local path; the consuming
  task calls :func:`localize`, which points it at this machine's staging folder (fetching if needed).

The local staging cache is ``$ICM_LOCAL_CACHE/<sha256(url)[:12]>`` (default ``~/.cache/icm-lora``).
File locks (``<staging>/.locks``) stop two runs on one machine from building the same output; two
machines may both build an output that neither had, and then publish identical files.

This module and ``tasks.artifacts`` both use ``tasks.manifest``; this one does not import ``tasks.artifacts``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from icm_core.infra.io import ArtifactError, write_json
from tasks.manifest import MANIFEST, restat_manifest, verify_manifest


CACHE_ENV = "ICM_LOCAL_CACHE"


def is_remote(root: str | Path) -> bool:
    """Whether ``root`` is an fsspec URL (``proto://...``) rather than a local folder."""
    return isinstance(root, str) and "://" in root


def normalize_root(root: str | Path) -> str:
    """A local root as an absolute path; a URL unchanged except for a trailing slash."""
    if is_remote(root):
        return str(root).rstrip("/")
    return str(Path(root).expanduser().resolve())


def local_root(root: str | Path) -> Path:
    """Where this machine keeps the outputs of ``root``: the folder itself, or the URL's staging cache."""
    if not is_remote(root):
        return Path(root).expanduser().resolve()
    base = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "icm-lora").expanduser()
    return (base / hashlib.sha256(normalize_root(root).encode()).hexdigest()[:12]).resolve()


def _fs(root: str):
    import fsspec

    return fsspec.core.url_to_fs(normalize_root(root))


def remote_path(root: str, folder: Path) -> tuple[Any, str]:
    """``(filesystem, path)`` of the remote twin of a local staging folder."""
    fs, base = _fs(root)
    relative = folder.resolve().relative_to(local_root(root)).as_posix()
    return fs, f"{base.rstrip('/')}/{relative}"


def remote_manifest(root: str, folder: Path) -> dict[str, Any] | None:
    """The remote twin's manifest, or None when it is not (completely) published."""
    fs, path = remote_path(root, folder)
    try:
        return json.loads(fs.cat_file(f"{path}/{MANIFEST}"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def publish(root: str, folder: Path, manifest: dict[str, Any]) -> None:
    """Upload a finished, verified local output folder to the remote root; the manifest goes last."""
    fs, path = remote_path(root, folder)
    fs.makedirs(path, exist_ok=True)
    for name in manifest["files"]:
        target = f"{path}/{name}"
        parent = target.rsplit("/", 1)[0]
        if parent != path:
            fs.makedirs(parent, exist_ok=True)
        fs.put_file(str(folder / name), target)
    fs.pipe_file(f"{path}/{MANIFEST}", (folder / MANIFEST).read_bytes())


def fetch(root: str, folder: Path) -> bool:
    """Download the remote twin of ``folder`` if it is published; verify it before it appears locally.

    Returns:
        True when ``folder`` now holds a verified copy, False when the remote has no complete output.

    Raises:
        ArtifactError: The remote output is corrupted (a file is missing or its sha256 differs).
    """
    manifest = remote_manifest(root, folder)
    if manifest is None:
        return False
    fs, path = remote_path(root, folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.fetch.", dir=folder.parent))
    try:
        for name in manifest["files"]:
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                fs.get_file(f"{path}/{name}", str(target))
            except FileNotFoundError as exc:
                raise ArtifactError(f"{path}/{name}: listed in the remote manifest but missing") from exc
        write_json(tmp / MANIFEST, manifest)
        try:
            verify_manifest(tmp, full=True)
        except ArtifactError as exc:
            raise ArtifactError(f"remote output {path} failed verification: {exc}") from exc
        restat_manifest(tmp, manifest)  # this machine's sizes and mtimes, so later checks are stat-only
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True


def write_root_json(root: str, name: str, payload: Any) -> Path:
    """Write a small JSON file at the top of the root (locally; and uploaded when the root is remote)."""
    local = write_json(local_root(root) / name, payload)
    if is_remote(root):
        fs, base = _fs(root)
        fs.makedirs(base, exist_ok=True)
        fs.pipe_file(f"{base.rstrip('/')}/{name}", local.read_bytes())
    return local


def read_root_json(root: str, name: str) -> Any | None:
    """Read a JSON file written by :func:`write_root_json` (the remote copy wins), or None."""
    if is_remote(root):
        fs, base = _fs(root)
        try:
            return json.loads(fs.cat_file(f"{base.rstrip('/')}/{name}"))
        except FileNotFoundError:
            return None
    path = local_root(root) / name
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
