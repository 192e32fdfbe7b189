"""Per-GPU global concurrency limits: a heavy stage on a GPU holds one slot of ``gpu-<host>-<index>``."""

from __future__ import annotations

import uuid

import torch
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

from tasks.stage import GPU_LIMIT_ENV, device_slot, gpu_limit_name


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


def test_gpu_stage_occupies_the_global_limit(prefect_api, monkeypatch):
    name = f"gpu-test-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv(GPU_LIMIT_ENV, name + "-{index}")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=f"{name}-5", limit=1))
        # Only the device name is resolved: no CUDA call, so this runs on a CPU-only machine.
        with device_slot("cuda:0"):
            assert client.read_global_concurrency_limit_by_name(f"{name}-5").active_slots == 1
        assert client.read_global_concurrency_limit_by_name(f"{name}-5").active_slots == 0
