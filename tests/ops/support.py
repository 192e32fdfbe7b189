"""Helpers of the operations tests: a category registry folder, and waiting on runs of a live server."""

from __future__ import annotations

import time
from pathlib import Path
from uuid import UUID

import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterParentFlowRunId,
)

from tests.flows.support import settled_task_runs


_ROOMS = ["kitchen", "hall", "attic", "cellar", "study", "garden room", "landing", "pantry"]
_ITEMS = ["oak table", "brass lamp", "wool rug", "tin box", "clock", "bookcase", "linen chest", "mirror"]


def inventory_text() -> str:
    """About 3,000 characters of a house inventory: a third kind of text, unlike recipes and forecasts."""
    docs = []
    for i, room in enumerate(_ROOMS):
        lines = [f"Inventory of the {room}, taken on day {i + 3} of the month."]
        for j in range(5):
            item = _ITEMS[(i + j) % len(_ITEMS)]
            condition = "good" if (i + j) % 3 else "fair"
            lines.append(f"Item {j + 1}: one {item}, condition {condition}, value {12 + 7 * j} pounds.")
        docs.append(" ".join(lines))
    return "\n\n".join(docs) + "\n"


def add_category(registry: Path, name: str, text: str) -> Path:
    """Drop a category into a registry folder: its text file and a one-category YAML file."""
    registry.mkdir(parents=True, exist_ok=True)
    (registry / "texts").mkdir(exist_ok=True)
    (registry / "texts" / f"{name}.txt").write_text(text, encoding="utf-8")
    entry = {"name": name, "description": f"{name} text for the operations tests", "source": f"texts/{name}.txt"}
    path = registry / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"categories": [entry]}, sort_keys=False), encoding="utf-8")
    return path


def wait_for_run(deployment_id: UUID, parameters: dict, timeout: float = 300):
    """The flow run of a deployment with these parameters, once it is in a final state."""
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
            )
            runs = [r for r in runs if all(r.parameters.get(k) == v for k, v in parameters.items())]
            if runs and runs[0].state and runs[0].state.is_final():
                return runs[0]
            time.sleep(1)
    seen = [(r.name, r.state_name) for r in runs]
    raise TimeoutError(f"no finished run of deployment {deployment_id} with {parameters} after {timeout} s: {seen}")


def subflow_task_states(flow_run_id: UUID) -> dict[str, str]:
    """``{task run name: state name}`` of the subflow runs of a flow run (the retrain run's pipeline)."""
    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id]))
        )
        assert children, f"flow run {flow_run_id} started no subflow"
    runs = settled_task_runs([child.id for child in children])
    names = [run.name for run in runs]
    assert len(names) == len(set(names)), f"duplicate task run names: {sorted(names)}"
    return {run.name: run.state.name for run in runs}
