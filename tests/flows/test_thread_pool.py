"""The flows' thread pool is bounded. Prefect's own default starts a thread per submitted task, and a torch
thread holds on to memory while it lives: the leave-out flow's 1,640 evaluations made 1,634 threads and ran
the process out of memory (flows/runtime.thread_pool_size)."""

from __future__ import annotations

import os
import threading
import time

import pytest
from prefect import flow, task
from prefect.cache_policies import NONE
from prefect.settings import PREFECT_TASK_RUNNER_THREAD_POOL_MAX_WORKERS, temporary_settings
from prefect.task_runners import ThreadPoolTaskRunner

from flows import ablations, detection, generate, pipeline, zeroshot
from flows import retrain as registry
from flows.runtime import make_task_runner, thread_pool_size, thread_task_runner


def all_flows():
    modules = (ablations, detection, generate, pipeline, registry, zeroshot)
    return [
        value
        for module in modules
        for value in vars(module).values()
        if hasattr(value, "task_runner") and getattr(value, "__module__", None) == module.__name__
    ]


def test_every_flow_runs_its_tasks_on_a_bounded_thread_pool():
    flows = all_flows()
    assert {f.name for f in flows} >= {
        "icm-pipeline", "icm-zeroshot", "icm-ablations", "icm-detection", "generate-adapter",
        "scan-categories", "icm-zero-shot-publish", "icm-retrain",
    }  # fmt: skip
    for f in flows:
        assert isinstance(f.task_runner, ThreadPoolTaskRunner), f.name
        # What each flow run uses: Prefect duplicates the flow's runner per run.
        assert f.task_runner.duplicate()._max_workers == thread_pool_size() <= 32, f.name


def test_pool_size_is_explicit_then_prefect_setting_then_cores_plus_four():
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert thread_pool_size() == min(32, cores + 4)
    assert thread_pool_size(3) == 3
    with temporary_settings({PREFECT_TASK_RUNNER_THREAD_POOL_MAX_WORKERS: 2}):
        assert thread_pool_size() == 2
        assert thread_pool_size(5) == 5
    assert make_task_runner("threads")._max_workers == min(32, cores + 4)
    assert make_task_runner("threads", workers=3)._max_workers == 3
    with pytest.raises(ValueError, match="workers: a thread pool needs at least 1 thread, got 0"):
        thread_pool_size(0)


@task(cache_policy=NONE, persist_result=False)
def which_thread(i: int) -> int:
    time.sleep(0.05)  # long enough that an unbounded pool would start a thread for each waiting task
    return threading.get_ident()


@flow(task_runner=thread_task_runner(2))
def many_small_tasks(n: int) -> list[int]:
    return [f.result() for f in which_thread.map(range(n))]


def test_a_flow_submitting_many_tasks_uses_only_the_pool_s_threads(prefect_api):
    idents = many_small_tasks(12)
    assert len(idents) == 12
    assert len(set(idents)) <= 2
