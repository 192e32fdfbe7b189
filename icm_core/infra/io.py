"""Artifact I/O: safetensors files with a JSON sidecar, written atomically, verified by sha256.

Every file this project writes goes through :func:`atomic_write` (write to a temporary file in the
same folder, fsync, then ``os.replace``), so a crash never leaves a half-written file under the
final name. Every tensor file gets a sidecar ``<name>.json`` holding its sha256 and metadata; the
sidecar is written last, so its presence means the tensor file is complete.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from icm_core.infra.faults import fault_point


if TYPE_CHECKING:  # torch and safetensors load when tensors are read or written, not with this module: the
    import torch  # warm CLI path (a run answered from its record) reads only JSON and hashes (flows/run_record.py)


class ArtifactError(RuntimeError):
    """An artifact is missing, truncated, corrupted or of the wrong kind. The message names the file."""


HASHED: dict[str, int] = {"files": 0, "bytes": 0}
"""Files and bytes :func:`sha256_file` has read in this process (``scripts/bench_warm.py`` reports them)."""


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk_size), b""):
            digest.update(block)
            size += len(block)
    HASHED["files"] += 1
    HASHED["bytes"] += size
    return digest.hexdigest()


def package_folder(package: str) -> Path | None:
    """Folder of an installed package, found without importing it (some packages import heavy or
    missing dependencies in their ``__init__``); None when it is not installed."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@contextmanager
def atomic_path(final_path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``final_path``; on success, fsync and rename it into place.

    On any exception the temporary file is removed and ``final_path`` is left untouched.
    """
    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final_path.name}.", suffix=".tmp", dir=final_path.parent)
    os.close(fd)
    tmp_path = Path(tmp_name)
    try:
        yield tmp_path
        fault_point("io.before_rename", final_path, temp=tmp_path)
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, final_path)
        _fsync_dir(final_path.parent)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_folder(final_dir: str | Path, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary folder next to ``final_dir``; on success rename it into place.

    An existing ``final_dir`` is replaced when ``replace`` (moved aside first, then removed), or kept
    (and the new folder discarded) when not: for outputs that another process may have finished first.
    On any exception the temporary folder is removed and ``final_dir`` is left untouched.
    """
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.", dir=final_dir.parent))
    try:
        yield tmp
        fault_point("io.folder_before_rename", final_dir)
        if not final_dir.exists():
            tmp.rename(final_dir)
        elif replace:
            old = final_dir.with_name(f".{final_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            final_dir.rename(old)
            tmp.rename(final_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            shutil.rmtree(tmp)
        _fsync_dir(final_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write(final_path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` and atomically move the result to ``final_path``."""
    with atomic_path(final_path) as tmp:
        write(tmp)
    return Path(final_path)


def write_json(path: str | Path, payload: Any) -> Path:
    """Write JSON atomically (sorted keys, so equal payloads give equal bytes)."""
    text = json.dumps(payload, indent=2, sort_keys=True, default=_json_default) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc})") from exc


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):  # torch.Size included
        return list(value)
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON")


def sidecar_path(path: str | Path) -> Path:
    """``foo.safetensors`` -> ``foo.json``."""
    path = Path(path)
    return path.with_suffix(".json")


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None) -> str:
    """Save tensors as safetensors plus a JSON sidecar ``{"sha256": ..., "meta": ...}``; return the sha256.

    Both files are written atomically; the sidecar is written after the tensor file, so a sidecar
    whose hash matches proves the tensor file is complete.
    """
    from safetensors.torch import save_file

    path = Path(path)
    contiguous = {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}
    check_finite(contiguous, path, "; refusing to save it")
    atomic_write(path, lambda tmp: save_file(contiguous, str(tmp)))
    fault_point("io.before_sidecar", path)
    digest = sha256_file(path)
    write_json(sidecar_path(path), {"file": path.name, "sha256": digest, "meta": meta or {}})
    return digest


def verify_file(path: str | Path, expected_sha256: str | None = None) -> str:
    """Check that ``path`` exists and matches its sidecar's (or the given) sha256; return the sha256."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: file not found")
    if expected_sha256 is None:
        expected_sha256 = read_json(sidecar_path(path)).get("sha256")
    actual = sha256_file(path)
    if actual != expected_sha256:
        raise ArtifactError(f"{path}: sha256 mismatch (expected {expected_sha256}, found {actual}); file is corrupted")
    return actual


def load_tensors(path: str | Path, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a safetensors file and its sidecar metadata, checking the sha256 first when ``verify``."""
    from safetensors.torch import load_file

    path = Path(path)
    check_safetensors_file(path)
    meta: dict[str, Any] = {}
    side = sidecar_path(path)
    if verify:
        verify_file(path)
    if side.is_file():
        meta = read_json(side).get("meta", {})
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise ArtifactError(f"{path}: cannot read safetensors ({exc})") from exc
    check_finite(tensors, path)
    return tensors, meta


def check_finite(tensors: dict[str, torch.Tensor], where: str | Path, consequence: str = "") -> None:
    """Refuse weights with NaN or Inf (a diverged run, a broken export), naming the file and the tensor."""
    import torch

    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ArtifactError(f"{where}: tensor {name!r} contains NaN or Inf{consequence}")


def check_safetensors_file(path: str | Path) -> None:
    """Refuse files that are not safetensors (pickles and zip-pickles in particular), naming the file.

    A safetensors file is an 8-byte little-endian header length followed by a JSON header; anything
    else is rejected before any loader sees it.
    """
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: file not found")
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) >= 8:
        header_len = int.from_bytes(head[:8], "little")
        if 0 < header_len <= size - 8 and head[8:9] == b"{":
            return
    if head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        raise ArtifactError(f"{path}: this is a pickle file, not safetensors; pickles are never loaded")
    if len(head) < 8:
        raise ArtifactError(f"{path}: truncated safetensors file ({size} bytes)")
    raise ArtifactError(f"{path}: not a valid safetensors file (bad header)")


def csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    """CSV of rows (the union of their keys, in first-seen order)."""
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
