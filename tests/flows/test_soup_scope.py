"""Model Soup with ``soup.scope=trajectory``: one soup per category, of that category's own checkpoints."""

from __future__ import annotations

import json

from tests.flows.support import CATEGORIES, states_by_name


def test_trajectory_scope_builds_one_soup_per_category_from_its_checkpoints(workspace):
    config = workspace.config.model_copy(
        update={
            "soup": workspace.config.soup.model_copy(update={"scope": "trajectory"}),
            "methods": ("base", "lora", "model_soup", "icm_lora"),
        }
    )
    state = workspace.run(config=config)
    assert state.is_completed(), state.message
    states = states_by_name(state)
    assert {name for name in states if name.startswith("soup-")} == {f"soup-{c}" for c in CATEGORIES}
    assert not any("pdiff" in name for name in states)  # not asked for, not built

    for category in CATEGORIES:
        [trajectory] = workspace.root.glob(f"lora/{category}/*/trajectory.json")
        checkpoints = json.loads(trajectory.read_text())["files"]
        [manifest] = workspace.root.glob(f"soup/{category}/*/manifest.json")
        meta = json.loads(manifest.read_text())["meta"]
        assert meta["sources"] == [f"{category}/{name}" for name in checkpoints]
        assert meta["rank"] == config.lora.rank * len(checkpoints)  # exact: rank = sum of the averaged ranks

    rows = {row["category"]: row for row in state.result()["rows"]}
    assert set(rows) == set(CATEGORIES)
    for row in rows.values():
        assert row["ppl_model_soup"] > 0 and "ppl_cond_pdiff" not in row
    report = next(workspace.root.glob("report/*/report.md")).read_text()
    for category in CATEGORIES:
        assert f"Model Soup ({category})" in report
