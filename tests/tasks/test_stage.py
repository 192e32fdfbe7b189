"""Tests of tasks.stage: every stage task's cache key is derived from its bound arguments, by one helper.

A cache key built from a hand-copied dict of arguments goes stale the day an argument is added. Here every task
made with ``stage_task`` is checked on its real signature: each argument not excluded changes the key, each
excluded one does not, and the key the cache policy looks up (from the parameters Prefect hands it) is the key of
the folder the task builds.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest
import torch
from prefect import Task

import tasks
from tasks.artifacts import ArtifactCachePolicy, stage_key
from tasks.stage import GPU_LIMIT_ENV, STAGE_TASKS, gpu_limit_name, retry_unless_bad_input, stage_inputs


for _module in pkgutil.iter_modules(tasks.__path__):
    importlib.import_module(f"tasks.{_module.name}")  # every stage task registers itself when its module loads


def _sentinels(task: Task, root: str) -> dict:
    """A distinct plain value for every parameter (a category name where the folder needs one, a list for a
    fan-out's list, the root a real folder)."""
    policy: ArtifactCachePolicy = task.cache_policy
    values = {}
    for name in inspect.signature(task.fn).parameters:
        values[name] = f"value-{name.replace('_', '-')}"
    values["root"] = root
    if policy.fan_out is not None:
        values[policy.fan_out[0]] = ["cat-a", "cat-b"]
    elif policy.category_arg is not None:
        values[policy.category_arg] = "cat-a"
    return values


def _policy_key(task: Task, values: dict) -> str:
    return task.cache_policy.compute_key(None, values, {})


def test_every_stage_task_registered():
    names = {task.name for task in STAGE_TASKS}
    assert {"finetune-lora", "evaluate", "train-generator", "report", "zeroshot-vector-adapter"} <= names
    assert len(STAGE_TASKS) >= 20


@pytest.mark.parametrize("task", STAGE_TASKS, ids=lambda t: t.name)
def test_every_argument_reaches_the_key_and_excluded_ones_do_not(task, tmp_path):
    policy: ArtifactCachePolicy = task.cache_policy
    parameters = list(inspect.signature(task.fn).parameters)
    assert set(policy.exclude) <= set(parameters), f"{task.name}: excludes an argument it does not have"
    assert "root" in parameters, f"{task.name}: a stage task writes under an artifacts root"
    values = _sentinels(task, str(tmp_path))
    base = _policy_key(task, values)
    for name in parameters:
        if name == "root" or (policy.fan_out is not None and name == policy.fan_out[0]):
            continue
        if policy.category_arg == name:
            changed = {**values, name: "cat-b"}
        else:
            changed = {**values, name: f"other-{name}"}
        key = _policy_key(task, changed)
        if name in policy.exclude:
            assert key == base, f"{task.name}: excluded argument {name!r} changed the key"
        else:
            assert key != base, f"{task.name}: argument {name!r} does not reach the cache key"


@pytest.mark.parametrize("task", STAGE_TASKS, ids=lambda t: t.name)
def test_the_policy_looks_up_the_key_the_task_builds(task, tmp_path):
    """The policy hashes Prefect's parameters; the task keys its folder by its bound arguments: the same key."""
    policy: ArtifactCachePolicy = task.cache_policy
    values = _sentinels(task, str(tmp_path))
    built = stage_inputs(task.fn.__wrapped__, (), values, policy.exclude)
    if policy.fan_out is None:
        assert _policy_key(task, values) == stage_key(policy.stage, built)
    else:
        assert _policy_key(task, values) == stage_key(policy.stage, built)  # the record's key is the batch's
        list_arg, item_arg = policy.fan_out
        assert {stage_key(policy.stage, {**built, item_arg: item}) for item in values[list_arg]} != {
            stage_key(policy.stage, built)
        }


def test_defaults_are_part_of_the_inputs():
    def stage(category: str, root: str, cfg: int = 3, resume: int = 1) -> None: ...

    assert stage_inputs(stage, ("news",), {"root": "r"}, ("resume",)) == {"category": "news", "root": "r", "cfg": 3}


def test_no_task_retries_bad_input():
    """Every task that retries has a retry condition that refuses bad input."""
    checked = 0
    for _module in pkgutil.iter_modules(tasks.__path__):
        module = importlib.import_module(f"tasks.{_module.name}")
        for name, value in vars(module).items():
            if isinstance(value, Task) and value.retries:
                assert value.retry_condition_fn is retry_unless_bad_input, f"{module.__name__}.{name}"
                checked += 1
    assert checked >= 7


def test_every_cached_task_is_a_stage_task():
    """A task keyed by an artifact cache policy but built by hand would key its folder by a hand-made dict."""
    for _module in pkgutil.iter_modules(tasks.__path__):
        module = importlib.import_module(f"tasks.{_module.name}")
        for name, value in vars(module).items():
            if isinstance(value, Task) and isinstance(value.cache_policy, ArtifactCachePolicy):
                assert value in STAGE_TASKS, f"{module.__name__}.{name} is not made with stage_task"


def test_limit_names(monkeypatch):
    monkeypatch.setenv(GPU_LIMIT_ENV, "gpu-{host}-{index}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert gpu_limit_name(torch.device("cpu")) is None
    assert gpu_limit_name(torch.device("cuda")).endswith("-0")
    assert gpu_limit_name(torch.device("cuda:1")).endswith("-1")
    # A worker restricted to physical GPUs 2 and 3 sees them as cuda:0 and cuda:1: the limit names the physical one.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert gpu_limit_name(torch.device("cuda:1")).endswith("-3")
    monkeypatch.setenv(GPU_LIMIT_ENV, "off")
    assert gpu_limit_name(torch.device("cuda:0")) is None
