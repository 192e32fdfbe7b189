"""The ablation flow runs pipeline variants as subflows that share cached stages, and writes Tables 4-6."""

from __future__ import annotations

import json

import pytest

from flows.ablations import ablation_variants, channel_plan, icm_ablations
from icm_core.config import RunConfig
from icm_core.generator.config import OFFICIAL_CHANNELS
from tests.flows.support import CATEGORIES, settled_task_runs, states_by_name, task_runs_of


def subflow_runs(state) -> list:
    """The pipeline subflow runs of an ablation run (Prefect tracks each through a task run of the parent)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentTaskRunId

    parent_task_ids = [t.id for t in task_runs_of(state)]
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_task_run_id=FlowRunFilterParentTaskRunId(any_=parent_task_ids))
        )


def task_runs_of_flow(flow_run_id) -> list:
    return settled_task_runs([flow_run_id])


def test_channel_plans():
    assert channel_plan(12) == OFFICIAL_CHANNELS
    assert channel_plan(4) == (8, 16, 16, 8)
    assert len(channel_plan(8)) == 8 and channel_plan(8)[0] == channel_plan(8)[-1] == 8
    with pytest.raises(ValueError, match="depths"):
        channel_plan(1)


def test_variants_are_validated_and_deduplicated():
    variants = ablation_variants(RunConfig(), [1, 2], [4, 12], [2], ["hidden_state", "description"])
    assert [v.name for v in variants] == [
        "rank-1",
        "rank-2",
        "depth-4-rank-2",
        "depth-12-rank-2",
        "source-hidden_state",
        "source-description",
    ]
    assert variants[2].config.cvae.channels == (8, 16, 16, 8) and variants[2].config.methods == (
        "base",
        "lora",
        "icm_lora",
    )
    assert variants[3].config == variants[4].config  # run once, reported twice
    with pytest.raises(ValueError, match="task_vector.source"):
        ablation_variants(RunConfig(), [2], [], [], ["clip-vision"])


def test_ablation_flow_writes_tables(workspace):
    # A plain pipeline run first: latest.json is its pointer, and the ablations must not move it.
    pipeline = workspace.run()
    assert pipeline.is_completed(), pipeline.message
    latest = (workspace.root / "latest.json").read_bytes()
    assert json.loads(latest)["generator"] == pipeline.result()["generator"]

    def run_ablations():
        return icm_ablations(
            config=workspace.config,
            categories_file=str(workspace.categories_file),
            only=None,
            ranks=[1, 2],
            depths=[4],
            depth_ranks=[2],
            sources=["description"],
            root=str(workspace.root),
            return_state=True,
        )

    state = run_ablations()
    assert state.is_completed(), state.message
    out = state.result()
    # Every variant recorded its own pointer; latest.json still names the pipeline's generator (a plain
    # generate_adapter keeps using it).
    assert (workspace.root / "latest.json").read_bytes() == latest
    pointers = {p.stem: json.loads(p.read_text()) for p in (workspace.root / "ablations").glob("*.json")}
    assert set(pointers) == {"rank-1", "rank-2", "depth-4-rank-2", "source-description"}
    assert pointers["source-description"]["generator"] != json.loads(latest)["generator"]
    text = (workspace.root / "latest-ablations.json").read_text()
    assert json.loads(text)["report"] == out["report"]
    report = out["report"]
    folder = workspace.root / "ablation_report"
    [md] = folder.glob("*/ablations.md")
    assert str(md) == report
    for name in ("ablations.md", "ablations.json", "ablations.csv"):  # no absolute path of this machine
        assert str(workspace.root.resolve()) not in (md.parent / name).read_text(), name
    body = md.read_text()
    for heading in ("LoRA rank (paper Table 4)", "paper Table 5", "paper Table 6"):
        assert heading in body
    assert body.count("\n| 1 |") >= 2 and body.count("\n| 2 |") >= 2  # rank rows in Table 4 and storage
    assert "| 4 | 2 |" in body and "| description |" in body
    assert (md.parent / "gain_vs_rank.png").read_bytes()[:4] == b"\x89PNG"
    summary = {row["variant"]: row for row in out["summary"]}
    assert set(summary) == {"rank-1", "rank-2", "depth-4-rank-2", "source-description"}
    assert summary["rank-2"]["lora_params"] == 2 * summary["rank-1"]["lora_params"]
    for name in CATEGORIES:
        # The depth variant changes only the CVAE: its LoRA PPL is the rank-2 run's.
        assert summary["depth-4-rank-2"][f"ppl_lora_{name}"] == summary["rank-2"][f"ppl_lora_{name}"]
        assert (
            f"ppl_cond_pdiff_{name}" in summary["rank-1"] and f"ppl_cond_pdiff_{name}" not in summary["depth-4-rank-2"]
        )

    # The subflows share cached stages; a rerun of the whole ablation is all cache hits.
    again = run_ablations()
    assert again.is_completed()
    assert states_by_name(again)["ablation-report"] == "Cached"
    subflows = subflow_runs(again)
    assert len(subflows) == 4  # rank-1, rank-2, depth-4, description: each a pipeline subflow
    for run in subflows:
        states = {t.name: t.state.name for t in task_runs_of_flow(run.id)}
        assert states and set(states.values()) == {"Cached"}, (run.name, states)
    assert again.result()["summary"] == out["summary"]
