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
