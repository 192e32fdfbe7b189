"""The registry scan flow: what it reports and the state it keeps (events are exercised end to end in
tests/ops/test_retrain_trigger.py against a real server)."""

from __future__ import annotations

import json

from flows.retrain import scan_categories
from tasks.registry_state import STATE_FILE
from tests.flows.support import forecast_text, recipe_text
from tests.ops.support import add_category


def test_scan_reports_added_changed_removed_and_keeps_state(prefect_api, tmp_path):
    registry, root = tmp_path / "registry", tmp_path / "artifacts"
    add_category(registry, "recipes", recipe_text())
    add_category(registry, "notes", forecast_text())
    # A first scan without a baseline (a new checkout) records the registry and starts no retrain for the
    # categories already there: no events at all.
    first = scan_categories(registry=str(registry), root=str(root))
    assert (first["added"], first["changed"], first["removed"], first["baseline"]) == ([], [], [], True)
    state = json.loads((root / STATE_FILE).read_text())
    assert state[str(registry.resolve())]["categories"] == first["categories"]
    assert sorted(first["categories"]) == ["notes", "recipes"]

    assert scan_categories(registry=str(registry), root=str(root))["added"] == []  # nothing new: no events

    (registry / "notes.yaml").unlink()
    add_category(registry, "forecast", forecast_text())
    (registry / "texts" / "recipes.txt").write_text(recipe_text() + "\nA last recipe: toast. Toast the bread.\n")
    second = scan_categories(registry=str(registry), root=str(root))
    assert (second["added"], second["changed"], second["removed"]) == (["forecast"], ["recipes"], ["notes"])

    (registry / "recipes.yaml").unlink()
    third = scan_categories(registry=str(registry), root=str(root))
    assert (third["added"], third["changed"], third["removed"]) == ([], [], ["recipes"])
    assert sorted(json.loads((root / STATE_FILE).read_text())[str(registry.resolve())]["categories"]) == ["forecast"]


def test_retrain_with_baseline_records_the_registry(workspace, tmp_path):
    """The retrain deployment's ``baseline=true`` run trains a new registry and records it as the scan baseline,
    so the first scheduled scan emits nothing (no retrain per existing category)."""
    from flows.retrain import retrain_categories

    registry = tmp_path / "registry"
    add_category(registry, "recipes", recipe_text())
    add_category(registry, "forecast", forecast_text())
    root = str(workspace.root)
    summary = retrain_categories(registry=str(registry), root=root, config=workspace.config, baseline=True)
    assert sorted(row["category"] for row in summary["rows"]) == ["forecast", "recipes"]
    state = json.loads((workspace.root / STATE_FILE).read_text())
    assert sorted(state[str(registry.resolve())]["categories"]) == ["forecast", "recipes"]
    scan = scan_categories(registry=str(registry), root=str(workspace.root))
    assert (scan["added"], scan["changed"], scan["removed"]) == ([], [], [])
