"""The report stage publishes its results to the Prefect UI as artifacts of the flow run."""

from __future__ import annotations

import json
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
    ArtifactFilterType,
)

from icm_core.report.pipeline import FIGURES
from icm_core.report.plots import embed_figures, png_data_url
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
    # The UI's report is report.md with its figures embedded (the UI cannot fetch the worker's PNG files).
    assert report.data == embed_figures(report_md.read_text(), report_md.parent)
    for name in FIGURES:
        assert f"]({name})" in report_md.read_text() and f"]({name})" not in report.data
        assert f"]({png_data_url(report_md.parent / name)})" in report.data
    # No absolute paths of this machine in the report files or the UI: paths are relative to the root.
    root = str(workspace.root.resolve())
    for name in ("report.md", "results.json", "results.csv", "storage.csv"):  # (manifest.json is internal)
        assert root not in (report_md.parent / name).read_text(), name
    results = json.loads((report_md.parent / "results.json").read_text())
    for row in results["rows"]:
        relative = row["adapter_dir"]
        assert relative.startswith(f"adapters/{row['category']}/") and relative.endswith("/adapter"), relative
        assert (workspace.root / row["adapter_dir"] / "adapter_config.json").is_file()

    # Where the outputs are: root-relative paths and a note instead of file:// links a browser cannot open.
    [outputs] = artifacts_of(flow_run_id, "icm-outputs")
    assert "](file:" not in outputs.data and root not in outputs.data
    assert "cannot open" in outputs.data
    for row in rows:
        relative = Path(row["adapter_dir"]).resolve().relative_to(workspace.root.resolve()).as_posix()
        assert f"`{relative}`" in outputs.data
    [generator_file] = workspace.root.glob("generator/*/generator.safetensors")
    assert f"`{generator_file.relative_to(workspace.root).as_posix()}`" in outputs.data


def test_long_stages_show_progress(workspace):
    state = workspace.run()
    assert state.is_completed(), state.message
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]),
                type=ArtifactFilterType(any_=["progress"]),
            )
        )
    descriptions = {artifact.description for artifact in found}
    for stage in ("finetune-lora", "task-vector", "evaluate", "sample ("):
        assert any(d and d.startswith(stage) for d in descriptions), (stage, descriptions)
    assert any(d and d.startswith("fine-tune lora-") for d in descriptions), descriptions
    assert any(d and d.startswith("train the ICM-LoRA CVAE") for d in descriptions), descriptions
    assert all(float(a.data) == 100.0 for a in found), [(a.description, a.data) for a in found]
