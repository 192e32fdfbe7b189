"""The report stage publishes its results to the Prefect UI as artifacts of the flow run."""

from __future__ import annotations

import json
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

from tests.flows.support import CATEGORIES


def artifacts_of(flow_run_id, key: str) -> list:
    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]), key=ArtifactFilterKey(any_=[key])
            )
        )


def test_report_artifacts(workspace):
    state = workspace.run()
    assert state.is_completed(), state.message
    flow_run_id = state.state_details.flow_run_id
    rows = state.result()["rows"]

    [table] = artifacts_of(flow_run_id, "icm-eval-summary")
    assert table.type == "table"
    data = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert sorted(row["category"] for row in data) == sorted(CATEGORIES)
    for row in data:
        assert "adapter_dir" not in row
        [expected] = [r for r in rows if r["category"] == row["category"]]
        assert row["ppl_icm_lora"] == expected["ppl_icm_lora"] and row["bpc_lora"] == expected["bpc_lora"]

    [report] = artifacts_of(flow_run_id, "icm-report")
    assert report.type == "markdown"
    assert report.data.startswith("# ICM-LoRA results")
    for name in CATEGORIES:
        assert f"| {name} |" in report.data
    [report_md] = workspace.root.glob("report/*/report.md")
    assert report.data == report_md.read_text()

    # Prefect stores link artifacts as markdown links.
    for row in rows:
        [link] = artifacts_of(flow_run_id, f"adapter-{row['category']}")
        assert f"]({Path(row['adapter_dir']).resolve().as_uri()})" in link.data
    [generator] = artifacts_of(flow_run_id, "icm-generator")
    [generator_file] = workspace.root.glob("generator/*/generator.safetensors")
    assert generator.data.endswith(f"({generator_file.resolve().as_uri()})")
