"""How every stage task runs: one output folder per stage and inputs, built once, reused after.

A stage task is made with :func:`stage_task`. Its function takes the stage's inputs and returns a :data:`Build`
(what writes the stage's files). The task (1) derives its cache key from its bound arguments, exactly as
:class:`~tasks.artifacts.ArtifactCachePolicy` does (:func:`stage_inputs`), (2) reuses the output folder when its
manifest is valid (this also resumes work a killed run finished but could not record), otherwise (3) runs the
build into the folder and writes the manifest last (:func:`run_stage`). Heavy stages hold a per-device slot so a
process never runs two of them on one device at once.

The long stages (LoRA fine-tuning, the CVAE, COND P-DIFF) also save resumable state while they train,
in ``.<key>.resume/`` next to their output folder (:func:`resume_dir`); a killed run's successor continues
from it ("resuming from step k" in the log) and the state is removed once the output's manifest is written.
How often is ``RunConfig.resume``, which the tasks take as ``resume`` and leave out of the cache key.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import socket
import threading
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from prefect import get_run_logger, task
from prefect.concurrency.sync import concurrency
from prefect.exceptions import MissingContextError

from icm_core.infra.faults import fault_point
from icm_core.infra.io import ArtifactError
from icm_core.infra.resume import Resumer
from icm_core.models.base_model import parse_device
from icm_core.models.identity import ModelLoadError
from tasks.artifacts import (
    ArtifactCachePolicy,
    ArtifactRef,
    category_name,
    output_dir,
    output_lock,
    ref_for,
    reset_folder,
    stage_key,
)
from tasks.manifest import valid_output, write_manifest
from tasks.store import fetch, is_remote, publish, remote_manifest


_device_locks: dict[str, threading.Lock] = {}
_device_locks_guard = threading.Lock()


GPU_LIMIT_ENV = "ICM_GPU_LIMIT"
"""Name template of the Prefect global concurrency limit per GPU (``{host}``, ``{index}``: the physical GPU
index, after CUDA_VISIBLE_DEVICES); ``off`` disables it. Default ``gpu-{host}-{index}``."""


def gpu_limit_name(device: torch.device) -> str | None:
    """The global concurrency limit that guards ``device`` across processes, or None (CPU, or disabled)."""
    template = os.environ.get(GPU_LIMIT_ENV, "gpu-{host}-{index}").strip()
    if device.type != "cuda" or template in ("", "off"):
        return None
    index = device.index or 0
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    physical = visible[index] if index < len(visible) else str(index)
    return template.format(host=socket.gethostname().split(".")[0], index=physical)


@contextmanager
def device_slot(device: str):
    """One heavy stage per device at a time: fanned-out tasks queue here instead of oversubscribing it.

    Within a process a lock per device does it. A GPU is also guarded across processes and machines (Dask
    or Ray workers, several Prefect workers on one host) by a Prefect global concurrency limit named
    :func:`gpu_limit_name` (create it with ``prefect gcl create gpu-<host>-<index> --limit 1``; while it
    does not exist Prefect only warns and the per-process lock is the only guard).
    """
    resolved = parse_device(device)  # the name only: the stage itself refuses a device the machine lacks
    with _device_locks_guard:
        lock = _device_locks.setdefault(str(resolved), threading.Lock())
    limit = gpu_limit_name(resolved)
    with lock:
        if limit is None:
            yield
            return
        with concurrency(limit, occupy=1, strict=False):
            yield


def _log():
    """The Prefect run logger inside a run, the module logger outside one."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("icm_lora.tasks")


def resume_dir(folder: Path) -> Path:
    """Where a stage building ``folder`` keeps its resumable state: a hidden sibling, so resetting the output
    folder keeps it, and readers of outputs never see it."""
    return folder.with_name(f".{folder.name}.resume")


def resumer(folder: Path, **every: int) -> Resumer:
    return Resumer(resume_dir(folder), every)


def run_stage(
    stage: str,
    category: str | None,
    inputs: dict[str, Any],
    build: Callable[[Path], dict[str, Any]],
) -> ArtifactRef:
    """Reuse a valid output folder for these inputs, or build it and write its manifest.

    Building holds the folder's lock: a concurrent run with the same inputs waits, then finds the
    finished folder and reuses it instead of training again. A build that finds resumable state (left by a
    killed run, :func:`resume_dir`) logs where it resumes from; the state is removed once the manifest is
    written.
    """
    root = inputs["root"]
    key = stage_key(stage, inputs)
    folder = output_dir(root, stage, key, category)
    manifest = valid_output(folder)
    if manifest is None:
        with output_lock(root, folder):
            manifest = valid_output(folder)  # another run may have finished it while we waited
            if manifest is None and is_remote(root) and _fetch_published(root, folder):
                manifest = valid_output(folder)
                _log().info("%s: fetched published artifact %s from %s", stage, folder.name, root)
                return ref_for(stage, category, key, folder, manifest)
            if manifest is None:
                reset_folder(folder)
                fault_point("stage.before_build", folder)
                point = Resumer(resume_dir(folder)).latest_label()
                if point is not None:
                    _log().info("%s: resuming from %s (state in %s)", stage, point, resume_dir(folder))
                meta = build(folder)
                fault_point("stage.before_manifest", folder)
                write_manifest(folder, meta)
                manifest = valid_output(folder, full=False)
                if manifest is None:  # pragma: no cover - only if the disk changed under us
                    raise RuntimeError(f"{folder}: output failed verification right after writing")
                Resumer(resume_dir(folder)).clear()
                fault_point("stage.after_manifest", folder)
                if is_remote(root):
                    publish(root, folder, manifest)
                return ref_for(stage, category, key, folder, manifest)
    fault_point("stage.reuse", folder)
    if is_remote(root) and remote_manifest(root, folder) is None:
        publish(root, folder, manifest)  # built here before the remote copy was lost (or never published)
    _log().info("%s: reusing complete artifact %s", stage, folder)
    return ref_for(stage, category, key, folder, manifest)


def _fetch_published(root: str, folder: Path) -> bool:
    """Fetch a published output; a corrupted remote copy is logged and rebuilt (then republished)."""
    try:
        return fetch(root, folder)
    except ArtifactError as exc:
        _log().warning("rebuilding: %s", exc)
        return False


TASK_DEFAULTS: dict[str, Any] = {"persist_result": True, "result_serializer": "json"}

BAD_INPUT_ERRORS = (ValueError, ModelLoadError, ArtifactError, FloatingPointError)
"""Failures that a retry would only repeat later: bad input, a broken artifact, a diverged run."""


def retry_unless_bad_input(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry transient failures (I/O, out of memory), not bad input."""
    return not isinstance(state.data, BAD_INPUT_ERRORS)


Build = Callable[[Path], dict[str, Any]]
"""What a stage task's function returns: it writes the stage's files into the (empty) output folder it is given
and returns the small metadata the folder's manifest records (and the task's ``ArtifactRef`` carries)."""

STAGE_TASKS: list[Any] = []
"""Every task made with :func:`stage_task`, in definition order (``tests/tasks`` checks each one's key)."""


def stage_inputs(fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any], exclude: tuple[str, ...]) -> dict:
    """The inputs of a stage's cache key: the arguments a call binds to ``fn``'s parameters, defaults applied,
    minus ``exclude``. Prefect hands :class:`~tasks.artifacts.ArtifactCachePolicy` the same bound parameters and
    it drops the same ``exclude``, so the key the policy looks up and the folder the task builds always agree, and
    an argument added to a task reaches its key without anyone listing it."""
    bound = inspect.signature(fn).bind(*args, **kwargs)
    bound.apply_defaults()
    return {name: value for name, value in bound.arguments.items() if name not in exclude}


def stage_task(
    stage: str,
    *,
    category_arg: str | None = "category",
    exclude: tuple[str, ...] = (),
    fan_out: tuple[str, str] | None = None,
    **options: Any,
):
    """Make a cached Prefect task of ``stage`` from a function that returns the stage's :data:`Build`.

    Args:
        stage: The stage's name: its folder under the artifacts root and part of its key.
        category_arg: The parameter naming the category (a name or a ``Category``) whose folder the output is in;
            None for stages of no single category (the generator, the reports).
        exclude: Parameters that never change the output (how often state is saved, where a shared pass starts):
            left out of the key. Everything else is in it.
        fan_out: ``(list_arg, item_arg)`` for a stage with one output per item of ``list_arg``: the function
            returns ``build_for(item) -> Build``, the task a list of refs, and each item's key is the inputs plus
            ``item_arg`` = the item (COND P-DIFF's batched sampling).
        options: ``prefect.task`` options (name, task_run_name, retries, ...). A task that retries retries only
            transient failures (:func:`retry_unless_bad_input`), never bad input.
    """
    policy = ArtifactCachePolicy(stage, category_arg=category_arg, exclude=exclude, fan_out=fan_out)
    if options.get("retries"):
        options.setdefault("retry_condition_fn", retry_unless_bad_input)

    def decorate(fn: Callable[..., Any]) -> Any:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            inputs = stage_inputs(fn, args, kwargs, exclude)
            build = fn(*args, **kwargs)
            if fan_out is None:
                category = category_name(inputs.get(category_arg)) if category_arg else None
                return run_stage(stage, category, inputs, build)
            list_arg, item_arg = fan_out
            return [
                run_stage(stage, category_name(item), {**inputs, item_arg: item}, build(item))
                for item in inputs[list_arg]
            ]

        made = task(cache_policy=policy, **{**TASK_DEFAULTS, **options})(run)
        STAGE_TASKS.append(made)
        return made

    return decorate
