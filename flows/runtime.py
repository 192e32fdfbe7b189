"""Where a flow's tasks run: the task runner (threads, Dask, Ray) and the worker's device.

Every flow uses a bounded thread pool by default (:func:`thread_task_runner`; Prefect's own default starts a
thread per submitted task): every task runs in the flow's process, heavy stages take turns per device
(``tasks.stage.device_slot``). To fan fine-tuning out over several processes or
machines, pick another runner::

    icm-lora pipeline --runner dask                         # a local Dask cluster (one worker per core)
    icm-lora pipeline --runner dask --workers 2
    icm-lora pipeline --runner dask --runner-address tcp://scheduler:8786   # an existing cluster
    icm-lora pipeline --runner ray --runner-address ray://head:10001

Dask needs the ``dask`` extra (``pip install -e ".[dask]"``), Ray the ``ray`` extra. With several
machines, give the pipeline an artifacts root they all reach (an fsspec URL, see ``tasks/store.py``).
"""

from __future__ import annotations

import os
from typing import Any

from flows.deploy_steps import checkout_folder
from icm_core.config import RunConfig
from icm_core.infra.confinement import (
    REGISTRIES_ENV,
    REMOTE_CODE_ENV,
    ROOTS_ENV,
    confine,
    parse_places,
    refuse_remote_code,
)
from tasks.store import local_root


RUNNERS = ("threads", "dask", "ray")
DEVICE_ENV = "ICM_DEVICE"


def thread_pool_size(workers: int | None = None) -> int:
    """Threads of the in-process task runner: ``workers`` when given, else Prefect's
    ``tasks.runner.thread_pool_max_workers`` setting (``PREFECT_TASK_RUNNER_THREAD_POOL_MAX_WORKERS``) when set,
    else Python's ``ThreadPoolExecutor`` default, ``min(32, cores + 4)``.

    Prefect's own default is unbounded: every submitted task gets a new thread, and a thread that has run torch
    ops holds on to memory while it lives (measured below; which allocator keeps it was not isolated). The
    leave-out flow submits 1,640 evaluations at once: that made 1,634 threads, the process grew by 20-40 MB per
    evaluation and was killed at 24 GiB. ``scripts/bench_task_threads.py`` (48 forward passes of SmolLM2-135M
    submitted at once, 2 cores): peak RSS 3,969 MB and 107 OS threads on Prefect's default pool, 2,314 MB and 23
    threads on this one, in the same wall time (153 s and 147 s). Heavy stages take turns per device anyway
    (``tasks.stage.device_slot``), so a small pool loses no parallelism.
    """
    if workers is not None:
        if workers < 1:
            raise ValueError(f"workers: a thread pool needs at least 1 thread, got {workers}")
        return workers
    from prefect.settings import get_current_settings

    configured = get_current_settings().tasks.runner.thread_pool_max_workers
    if configured:
        return configured
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(32, cores + 4)


def thread_task_runner(workers: int | None = None) -> Any:
    """Prefect's thread pool task runner with a bounded pool (:func:`thread_pool_size`): the default runner
    of every flow in this package."""
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=thread_pool_size(workers))


def make_task_runner(kind: str = "threads", address: str | None = None, workers: int | None = None) -> Any:
    """Build a Prefect task runner.

    Args:
        kind: ``threads`` (in-process thread pool), ``dask`` or ``ray``.
        address: Dask scheduler address (``tcp://host:8786``) or Ray address (``ray://host:10001``, ``auto``);
            None starts a local cluster for the run.
        workers: Size of the local cluster / thread pool (None: the library's default; for threads,
            :func:`thread_pool_size`).

    Raises:
        ValueError: Unknown kind, or an option that does not apply to it.
        ImportError: The runner's package is not installed (the message names the extra to install).
    """
    if kind not in RUNNERS:
        raise ValueError(f"runner: unknown task runner {kind!r}; choose one of {', '.join(RUNNERS)}")
    if kind == "threads":
        if address:
            raise ValueError("runner_address: the thread runner runs in this process; it takes no address")
        return thread_task_runner(workers)
    if kind == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError as exc:
            raise ImportError('the dask runner needs prefect-dask: pip install -e ".[dask]"') from exc
        if address:
            if workers:
                raise ValueError("workers: the cluster at runner_address has its own workers")
            return DaskTaskRunner(address=address)
        # One thread per worker process: the stages hold the GIL-free torch ops themselves, and a device
        # slot is per process, so processes (not threads) are the unit of parallelism here.
        cluster_kwargs: dict[str, Any] = {"processes": True, "threads_per_worker": 1}
        if workers:
            cluster_kwargs["n_workers"] = workers
        return DaskTaskRunner(cluster_kwargs=cluster_kwargs)
    try:
        from prefect_ray import RayTaskRunner
    except ImportError as exc:
        raise ImportError('the ray runner needs prefect-ray: pip install -e ".[ray]"') from exc
    init_kwargs: dict[str, Any] = {}
    if workers and not address:
        init_kwargs["num_cpus"] = workers
    return RayTaskRunner(address=address, init_kwargs=init_kwargs or None)


def device_from_env(config: RunConfig) -> RunConfig:
    """Let the worker choose the device: a config whose ``model.device`` is ``auto`` takes ``$ICM_DEVICE``.

    A GPU work pool sets ``ICM_DEVICE`` (and ``CUDA_VISIBLE_DEVICES``) in its job variables; a config
    that names a device explicitly keeps it.
    """
    device = os.environ.get(DEVICE_ENV, "").strip()
    if not device or config.model.device != "auto":
        return config
    return config.model_copy(update={"model": config.model.model_copy(update={"device": device})})


HUB_TOKEN_BLOCK_ENV = "ICM_HF_TOKEN_BLOCK"


def use_hub_token(logger: Any = None) -> bool:
    """Put the Hugging Face token of a Prefect Secret block into ``HF_TOKEN`` for this run (gated models).

    The block's name comes from ``$ICM_HF_TOKEN_BLOCK`` (the GPU pool sets ``hf-token``); the token is read
    at run time on the worker, so it never sits in a deployment's job variables. A token already in the
    environment wins; a missing block is a warning (public models need no token). Returns whether a token
    is set.
    """
    name = os.environ.get(HUB_TOKEN_BLOCK_ENV, "").strip()
    if os.environ.get("HF_TOKEN") or not name:
        return bool(os.environ.get("HF_TOKEN"))
    try:
        from prefect.blocks.system import Secret

        os.environ["HF_TOKEN"] = Secret.load(name).get()
        if logger is not None:
            logger.info("hub token: HF_TOKEN set for this run from the Secret block %r", name)
        return True
    except ValueError as exc:  # no such block
        if logger is not None:
            logger.warning("no Secret block %r for the hub token (%s); gated models will be refused", name, exc)
        return False


def in_deployment_run() -> bool:
    """Whether this flow run (or the flow run it is nested in) was created from a deployment."""
    from prefect.runtime import deployment

    return deployment.id is not None


def confine_deployment_run(
    root: str | None = None,
    registry: dict[str, str | None] | None = None,
    in_root: dict[str, str | None] | None = None,
    config: Any = None,
) -> None:
    """In a run that arrived through a deployment, refuse path parameters outside their allowed places, before
    any task starts (``icm_core/infra/confinement.py``); a run started any other way (the CLI, a script) is free.

    Args:
        root: The run's artifacts root: inside ``$ICM_ALLOWED_ROOTS`` (default: the checkout's ``artifacts/``).
        registry: ``{parameter: category file or registry folder}``: inside ``$ICM_ALLOWED_REGISTRIES`` (default:
            the checkout's ``categories/``).
        in_root: ``{parameter: path}`` of files and folders the run writes or reads, inside the root (its local
            staging copy when the root is a URL).
        config: The run's config (a pydantic model): no ``trust_remote_code`` set in it unless the worker's
            ``$ICM_ALLOW_REMOTE_CODE`` is 1.

    Raises:
        ConfinementError: One line naming the parameter and the allowed places.
    """
    if not in_deployment_run():
        return
    checkout = checkout_folder()
    roots = parse_places(os.environ.get(ROOTS_ENV), [checkout / "artifacts"])
    confine("root", root, roots, f"${ROOTS_ENV}")
    registries = parse_places(os.environ.get(REGISTRIES_ENV), [checkout / "categories"])
    for name, value in (registry or {}).items():
        confine(name, value, registries, f"${REGISTRIES_ENV}")
    if root is not None:
        for name, value in (in_root or {}).items():
            confine(name, value, [local_root(root)], "inside the run's root")
    if config is not None and os.environ.get(REMOTE_CODE_ENV, "").strip() != "1":
        refuse_remote_code(config.model_dump(mode="json"))
