"""Per-GPU global concurrency limits: a heavy stage on a GPU holds one slot of ``gpu-<host>-<index>``."""

from __future__ import annotations

import uuid

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

from tasks.stage import GPU_LIMIT_ENV, device_slot


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
