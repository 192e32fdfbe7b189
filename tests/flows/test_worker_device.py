"""Where a run executes: the device comes from the worker (a device the machine lacks fails the run at once,
naming it, with no task run and no retry), and a gated model's hub token comes from a Prefect Secret block."""

from __future__ import annotations

import os

import pytest
import torch
from prefect.blocks.system import Secret

from flows.runtime import HUB_TOKEN_BLOCK_ENV, device_from_env, use_hub_token
from icm_core.config import RunConfig
from icm_core.models.base_model import DeviceError, resolve_device
from icm_core.models.config import ModelConfig


no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


@no_cuda
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "mps", "tpu:0", "gpu0"])
def test_a_device_this_machine_lacks_is_named(device):
    with pytest.raises(DeviceError, match=repr(device)) as error:
        resolve_device(device)
    assert isinstance(error.value, ValueError) and "\n" not in str(error.value)


def test_auto_and_cpu_resolve():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_the_worker_chooses_the_device(monkeypatch):
    monkeypatch.setenv("ICM_DEVICE", "cpu")
    assert device_from_env(RunConfig()).model.device == "cpu"
    explicit = RunConfig(model=ModelConfig(device="cuda:1"))
    assert device_from_env(explicit).model.device == "cuda:1"  # a config that names a device keeps it
    monkeypatch.delenv("ICM_DEVICE")
    assert device_from_env(RunConfig()).model.device == "auto"


@no_cuda
def test_missing_device_fails_the_run_before_any_task(workspace, monkeypatch):
    monkeypatch.setenv("ICM_DEVICE", "cuda:0")
    model = workspace.config.model.model_copy(update={"device": "auto"})
    config = workspace.config.model_copy(update={"model": model})
    state = workspace.run(config=config)
    assert state.is_failed()
    assert "device 'cuda:0'" in state.message and "no usable CUDA" in state.message, state.message
    written = [p.name for p in workspace.root.glob("*") if not p.name.startswith(".")]  # (.prefect: Prefect's)
    assert written == [], f"no stage may start on a device the machine lacks: {written}"


def test_hub_token_from_a_secret_block(prefect_api, monkeypatch):
    before = os.environ.get("HF_TOKEN")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv(HUB_TOKEN_BLOCK_ENV, "test-hf-token")
    Secret(value="hf_test_value").save("test-hf-token", overwrite=True)
    try:
        assert use_hub_token() is True
        assert os.environ["HF_TOKEN"] == "hf_test_value"
        monkeypatch.setenv("HF_TOKEN", "from-env")
        assert use_hub_token() is True and os.environ["HF_TOKEN"] == "from-env"  # the environment wins
        monkeypatch.delenv("HF_TOKEN")
        monkeypatch.setenv(HUB_TOKEN_BLOCK_ENV, "no-such-block")
        assert use_hub_token() is False and "HF_TOKEN" not in os.environ
    finally:  # use_hub_token sets HF_TOKEN itself, outside monkeypatch's records: restore it by hand, after them
        monkeypatch.undo()
        if before is None:
            os.environ.pop("HF_TOKEN", None)
        else:
            os.environ["HF_TOKEN"] = before
