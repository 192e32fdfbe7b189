"""prefect.yaml: every deployment points at a real flow and only sets parameters that flow has."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml
from prefect import Flow
from prefect.flows import load_flow_from_entrypoint


REPO = Path(__file__).resolve().parents[2]
PREFECT_YAML = REPO / "prefect.yaml"


def deployments() -> list[dict]:
    spec = yaml.safe_load(PREFECT_YAML.read_text(encoding="utf-8"))
    assert isinstance(spec, dict) and spec.get("deployments"), f"{PREFECT_YAML}: no deployments"
    return spec["deployments"]


def test_prefect_yaml_parses():
    spec = yaml.safe_load(PREFECT_YAML.read_text(encoding="utf-8"))
    names = [d["name"] for d in spec["deployments"]]
    assert len(names) == len(set(names)), f"duplicate deployment names: {names}"
    for deployment in spec["deployments"]:
        assert deployment["work_pool"]["name"], deployment["name"]


@pytest.mark.parametrize("deployment", deployments(), ids=lambda d: d["name"])
def test_deployment_entrypoint_and_parameters(deployment, monkeypatch):
    monkeypatch.chdir(REPO)  # entrypoints are relative to the project root, as for `prefect deploy`
    path, _, func = deployment["entrypoint"].partition(":")
    assert (REPO / path).is_file(), deployment["entrypoint"]
    flow = load_flow_from_entrypoint(deployment["entrypoint"], use_placeholder_flow=False)
    assert isinstance(flow, Flow), f"{deployment['entrypoint']} is not a Prefect flow"
    assert flow.fn.__name__ == func

    parameters = deployment.get("parameters") or {}
    signature = inspect.signature(flow.fn)
    unknown = sorted(set(parameters) - set(signature.parameters))
    assert not unknown, f"{deployment['name']}: parameters {unknown} are not arguments of {func}"
    flow.validate_parameters(parameters)  # the values also fit the flow's types


def flow_name(deployment: dict) -> str:
    return load_flow_from_entrypoint(deployment["entrypoint"], use_placeholder_flow=False).name


def test_gpu_and_cpu_pools():
    spec = {d["name"]: d for d in deployments()}
    heavy = ("gpu", "generate-gpu", "on-category-change")
    for name in heavy:
        env = spec[name]["work_pool"]["job_variables"]["env"]
        assert spec[name]["work_pool"]["name"] == "gpu-pool", name
        # The device comes from the worker (ICM_DEVICE / CUDA_VISIBLE_DEVICES in its environment, else cuda
        # when the machine has one, else cpu): the pool forces none, so retraining also runs on a CPU machine.
        assert "ICM_DEVICE" not in env and "CUDA_VISIBLE_DEVICES" not in env, name
        assert env["HF_HUB_OFFLINE"] == "0" and env["ICM_HF_TOKEN_BLOCK"] == "hf-token", name
    for name, deployment in spec.items():
        env = deployment["work_pool"]["job_variables"]["env"]
        assert env["PREFECT_LOGGING_EXTRA_LOGGERS"] == "icm_lora", name
        if deployment["work_pool"]["name"] == "cpu-pool":
            assert env["HF_HUB_OFFLINE"] == "1", name  # the CPU demo stays offline
        assert "HF_TOKEN" not in env, f"{name}: a token belongs in a Secret block, not in job variables"
    assert spec["registry"]["work_pool"]["name"] == "cpu-pool"
    assert spec["registry"]["schedules"], "the registry scan must be scheduled"
    [trigger] = spec["on-category-change"]["triggers"]
    assert set(trigger["expect"]) == {"icm.category.added", "icm.category.changed", "icm.category.removed"}
    assert trigger["parameters"]["category"] == "{{ event.payload.category }}"
    # A new category's zero-shot adapter must not wait in the retrain queue: its own deployment, no limit.
    zero_shot = spec["zero-shot-on-category-added"]
    [trigger] = zero_shot["triggers"]
    assert trigger["expect"] == ["icm.category.added"] and "concurrency_limit" not in zero_shot
    assert trigger["parameters"]["category"] == "{{ event.payload.category }}"


def test_pull_step_runs_from_this_machines_checkout(tmp_path, monkeypatch):
    from flows.deploy_steps import HOME_ENV, use_checkout

    spec = yaml.safe_load(PREFECT_YAML.read_text(encoding="utf-8"))
    assert spec["pull"] == [{"flows.deploy_steps.use_checkout": {}}]
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(HOME_ENV, raising=False)
    assert use_checkout() == {"directory": str(REPO)} and Path.cwd() == REPO  # the installed checkout
    other = tmp_path / "elsewhere"
    (other / "flows").mkdir(parents=True)
    (other / "prefect.yaml").write_text("name: icm-lora\n")
    monkeypatch.setenv(HOME_ENV, str(other))
    assert use_checkout() == {"directory": str(other)} and Path.cwd() == other
    monkeypatch.setenv(HOME_ENV, str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError, match=HOME_ENV):
        use_checkout()


def test_deploy_all_against_a_local_server(live_server, monkeypatch):
    """`prefect deploy --all --no-prompt` registers every deployment, its pool, schedule and trigger."""
    from prefect.client.orchestration import get_client

    monkeypatch.chdir(REPO)
    specs = deployments()
    for pool in sorted({d["work_pool"]["name"] for d in specs}):
        live_server.cli("work-pool", "create", pool, "--type", "process", "--overwrite")
    live_server.cli("deploy", "--all", "--no-prompt", timeout=300)

    with live_server.connected(), get_client(sync_client=True) as client:
        created = []
        try:
            for spec in specs:
                deployment = client.read_deployment_by_name(f"{flow_name(spec)}/{spec['name']}")
                created.append(deployment)
                assert deployment.work_pool_name == spec["work_pool"]["name"]
                assert deployment.parameters == (spec.get("parameters") or {})
                assert bool(deployment.schedules) == bool(spec.get("schedules")), spec["name"]
                assert deployment.job_variables["env"] == spec["work_pool"]["job_variables"]["env"]
                assert deployment.pull_steps == [{"flows.deploy_steps.use_checkout": {}}], deployment.pull_steps
                automations = client.read_resource_related_automations(f"prefect.deployment.{deployment.id}")
                assert len(automations) == len(spec.get("triggers") or []), spec["name"]
                for automation in automations:
                    assert automation.trigger.expect == set(spec["triggers"][0]["expect"])
                    assert automation.actions[0].parameters == spec["triggers"][0]["parameters"]
        finally:  # leave the shared server without deployments that other tests' events could trigger
            for deployment in created:
                client.delete_resource_owned_automations(f"prefect.deployment.{deployment.id}")
                client.delete_deployment(deployment.id)
