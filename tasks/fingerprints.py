"""What a cache key is made of besides a stage's inputs: the project's code and the models a stage reads.

No Prefect here: the CLI computes an unchanged run's key (flows/run_record.py) from these without starting a
Prefect server. ``tasks.artifacts`` builds every stage key from them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import icm_core
from icm_core.generator.config import TaskVectorConfig
from icm_core.models import identity as model_identity
from icm_core.models.config import ModelConfig
from tasks.manifest import full_verify_requested
from tasks.store import local_root


TASKS_DIR = Path(__file__).parent
"""The ``tasks`` package folder (its sources are part of every fingerprint)."""

FINGERPRINTS = ".fingerprints"
"""Folder under the (local staging) artifacts root holding the fingerprint records of local model folders."""


PRESENTATION_MODULES = frozenset(
    {
        "icm_core/report/",
        "icm_core/cli.py",
        "icm_core/__main__.py",
        "icm_core/evaluation/stats.py",
        "icm_core/zeroshot/geometry.py",
        "icm_core/zeroshot/results.py",
        "tasks/report.py",
    }
)
"""Modules (a name ending in ``/``: every module of that folder) that only format results (tables, figures,
intervals, UI artifacts) or read the command line. Editing them re-renders reports but must not retrain anything,
so they are left out of the fingerprint of the compute stages. No compute module may import them
(``tests/test_architecture.py`` checks)."""


def is_presentation(name: str) -> bool:
    """Whether the module at ``name`` (``<package>/<relative path>``) is a presentation module."""
    return any(name == entry or (entry.endswith("/") and name.startswith(entry)) for entry in PRESENTATION_MODULES)


REPORT_STAGES = frozenset({"report", "ablation_report"})


@cache
def code_fingerprint(include_presentation: bool = True) -> str:
    """sha256 over icm_core's version and the source of icm_core and tasks: editing the method or a task
    wrapper invalidates cached stages (Prefect's TASK_SOURCE would only see the task function itself).

    With ``include_presentation=False`` the result-formatting modules are left out: that is the
    fingerprint of every compute stage, so a change to a table or a figure reruns only the reports.
    """
    digest = hashlib.sha256(icm_core.__version__.encode())
    skip = (lambda name: False) if include_presentation else is_presentation
    for package in (Path(icm_core.__file__).parent, TASKS_DIR):
        hash_sources(digest, package, skip)
    return digest.hexdigest()


def hash_sources(digest: Any, package: Path, skip: Callable[[str], bool] = lambda name: False) -> None:
    """Feed every ``.py`` file of ``package`` to ``digest`` in path order, each as its name
    (``<package>/<relative path>``) then its bytes; files whose name ``skip`` accepts are left out."""
    for path in sorted(package.rglob("*.py")):
        name = f"{package.name}/{path.relative_to(package).as_posix()}"
        if skip(name):
            continue
        digest.update(name.encode())
        digest.update(path.read_bytes())


def model_sources(value: Any) -> list[tuple[str, str]]:
    """The models a stage input makes the stage read, as ``(kind, name_or_path)``: the base LM of a
    ModelConfig, the sentence encoder of a description TaskVectorConfig, the detector of a DetectorConfig, the
    CLIP checkpoint of a CLIP detection task vector (the vision configs are recognised by class name, so this
    module does not import the vision package)."""
    if isinstance(value, ModelConfig):
        return [("base_model", value.name_or_path)]
    if isinstance(value, TaskVectorConfig) and value.source == "description":
        return [("text_encoder", value.text_encoder)]
    kind = type(value).__name__
    if kind == "DetectorConfig":
        return [("detector", value.name_or_path)]
    if kind == "DetectionTaskVectorConfig" and value.source.startswith("clip_") and value.clip_checkpoint:
        return [("clip", value.clip_checkpoint)]
    return []


def source_identity(kind: str, name_or_path: str, value: Any, record_dir: Path, full: bool) -> dict[str, Any]:
    """Content identity of one model a stage reads (see ``icm_core.models.identity``)."""
    if kind == "base_model":
        from icm_core.models.base_model import model_content_identity

        return model_content_identity(value, record_dir, full)
    if kind == "text_encoder":
        from icm_core.generator.task_vectors import BUILTIN_TEXT_ENCODERS, resolve_text_encoder

        if name_or_path in BUILTIN_TEXT_ENCODERS:
            name_or_path = resolve_text_encoder(name_or_path)
    elif kind == "detector" and value.kind == "mtcnn" and name_or_path == "facenet-pytorch":
        from icm_core.vision.mtcnn import facenet_folder

        name_or_path = str(facenet_folder() / "data")
    return model_identity.path_or_hub_identity(name_or_path, record_dir, full)


def model_identities(inputs: dict[str, Any], root: str | Path) -> dict[str, Any]:
    """``{input name: [identity, ...]}`` for every input that makes the stage read a model."""
    record_dir = local_root(root) / FINGERPRINTS
    full = full_verify_requested()
    found = {}
    for name, value in sorted(inputs.items()):
        sources = model_sources(value)
        if sources:
            found[name] = [source_identity(kind, path, value, record_dir, full) for kind, path in sources]
    return found
