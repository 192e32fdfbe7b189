"""The retrain flow serves a newly added category at once: a zero-shot adapter from the current generator (from the
category's text alone) before its fine-tune, replaced by the retrained generator's when the pipeline is done.

On the tiny model, through the real Prefect engine; the event -> trigger -> worker path is exercised in
tests/ops/test_retrain_trigger.py against a live server.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from flows.retrain import publish_new_category, retrain_categories, scan_categories
from icm_core.lora.adapters import read_adapter
from tasks.registry_state import STATE_FILE
from tests.flows.support import forecast_text, recipe_text
from tests.ops.support import add_category, inventory_text


def _state(root: Path, registry: Path) -> dict:
    return json.loads((root / STATE_FILE).read_text())[str(registry.resolve())]


def _artifacts(flow_run_id) -> dict[str, list]:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    by_key: dict[str, list] = {}
    for artifact in found:
        by_key.setdefault(artifact.key, []).append(artifact)
    return by_key


def _registry(tmp_path: Path) -> Path:
    registry = tmp_path / "registry"
    add_category(registry, "recipes", recipe_text())
    add_category(registry, "forecast", forecast_text())
    return registry


def test_a_new_category_is_served_zero_shot_before_its_fine_tune_then_replaced(workspace, tmp_path):
    tv = workspace.config.task_vector.model_copy(update={"hidden_from": "base"})
    cfg = workspace.config.model_copy(update={"task_vector": tv})
    registry, root = _registry(tmp_path), workspace.root

    first = retrain_categories(registry=str(registry), root=str(root), config=cfg, baseline=True)
    assert first["zero_shot"] is None  # a baseline run adds nothing: every category is served by the generator
    assert {n: e["source"] for n, e in _state(root, registry)["published"].items()} == {
        "recipes": "retrained",
        "forecast": "retrained",
    }

    add_category(registry, "inventory", inventory_text())
    started = datetime.now(timezone.utc)
    state = retrain_categories(
        category="inventory", change="added", registry=str(registry), root=str(root), config=cfg, return_state=True
    )
    assert state.is_completed(), state.message
    out = state.result()

    # 1. The zero-shot adapter: from the generator trained before the category existed, within a minute of the
    #    run's start, and before the category's fine-tune finished (its LoRA manifest is written later).
    early = out["zero_shot"]
    assert early["source"] == "zero-shot"
    assert early["generator"] == first["generator"] and early["generator_categories"] == ["forecast", "recipes"]
    assert early["task_vector_kind"] == f"hidden_state:base:{cfg.model.name_or_path}"
    published_at = datetime.fromisoformat(early["published_at"])
    assert (published_at - started).total_seconds() < 60
    [lora_manifest] = root.glob("lora/inventory/*/manifest.json")
    assert published_at.timestamp() < lora_manifest.stat().st_mtime
    zero_shot_weights, zero_shot_config = read_adapter(early["adapter_dir"])  # a standard PEFT folder
    assert zero_shot_config["r"] == cfg.lora.rank
    # Its task vector is the one the pipeline then used for the retrained generator (one cached output).
    assert len(list(root.glob("task_vectors/inventory/*/manifest.json"))) == 1

    # 2. Replaced by the retrained generator's adapter; the registry state says which is published now.
    section = _state(root, registry)
    now = section["published"]["inventory"]
    assert now["source"] == "retrained" and now["generator"] == out["generator"] != early["generator"]
    assert sorted(now["generator_categories"]) == ["forecast", "inventory", "recipes"]
    assert now["adapter_dir"] == next(r["adapter_dir"] for r in out["rows"] if r["category"] == "inventory")
    assert now["adapter_sha256"] != early["adapter_sha256"]
    assert section["history"]["inventory"] == [early]
    assert {section["published"][c]["generator"] for c in ("recipes", "forecast")} == {out["generator"]}
    assert all(datetime.fromisoformat(e["published_at"]) > published_at for e in section["published"].values())

    # 3. Both publications are UI artifacts of the run: a note per publication, and the table of what serves what.
    artifacts = _artifacts(state.state_details.flow_run_id)
    notes = sorted(artifacts["published-inventory"], key=lambda a: a.created)
    assert ["zero-shot" in notes[0].data, "retrained" in notes[-1].data] == [True, True]
    assert "replaces the zero-shot adapter" in notes[-1].data
    tables = sorted(artifacts["registry-published"], key=lambda a: a.created)
    last = json.loads(tables[-1].data) if isinstance(tables[-1].data, str) else tables[-1].data
    assert {row["category"]: row["source"] for row in last} == dict.fromkeys(
        ("forecast", "inventory", "recipes"), "retrained"
    )
    first_table = json.loads(tables[0].data) if isinstance(tables[0].data, str) else tables[0].data
    assert {row["category"]: row["source"] for row in first_table}["inventory"] == "zero-shot"

    # 4. A later scan keeps what was published (it rewrites only its own part of the state).
    assert scan_categories(registry=str(registry), root=str(root))["added"] == ["inventory"]
    assert _state(root, registry)["published"]["inventory"] == now


def test_a_generator_on_finetuned_vectors_gives_no_zero_shot_adapter(workspace, tmp_path):
    """The paper's (and the demo's) fine-tuned-model vectors need the new category's fine-tune: the retrain flow
    says so and serves the category once the retrained generator is ready."""
    assert workspace.config.task_vector.hidden_from == "finetuned"
    registry, root = _registry(tmp_path), workspace.root
    retrain_categories(registry=str(registry), root=str(root), config=workspace.config, baseline=True)
    add_category(registry, "inventory", inventory_text())

    out = retrain_categories(
        category="inventory", change="added", registry=str(registry), root=str(root), config=workspace.config
    )

    assert out["zero_shot"] is None
    assert not list(root.glob("zeroshot_adapters/inventory/*"))
    section = _state(root, registry)
    assert section["published"]["inventory"]["source"] == "retrained"
    assert "inventory" not in section.get("history", {})


def test_the_zero_shot_deployment_publishes_once_and_never_undoes_a_retrain(workspace, tmp_path):
    """``publish_new_category`` (the ``zero-shot-on-category-added`` deployment) publishes the same adapter the
    retrain flow would; a second or late run publishes nothing over it or over the retrained adapter."""
    tv = workspace.config.task_vector.model_copy(update={"hidden_from": "base"})
    cfg = workspace.config.model_copy(update={"task_vector": tv})
    registry, root = _registry(tmp_path), workspace.root
    retrain_categories(registry=str(registry), root=str(root), config=cfg, baseline=True)
    add_category(registry, "inventory", inventory_text())

    entry = publish_new_category(category="inventory", registry=str(registry), root=str(root), config=cfg)
    assert entry["source"] == "zero-shot" and not list(root.glob("lora/inventory"))  # no fine-tune yet
    assert _state(root, registry)["published"]["inventory"] == entry
    assert publish_new_category(category="inventory", registry=str(registry), root=str(root), config=cfg) is None
    assert publish_new_category(category="inventory", change="removed", registry=str(registry), root=str(root)) is None

    out = retrain_categories(category="inventory", change="added", registry=str(registry), root=str(root), config=cfg)
    assert out["zero_shot"] is None  # already published by the deployment: the same cached adapter
    now = _state(root, registry)["published"]["inventory"]
    assert now["source"] == "retrained" and _state(root, registry)["history"]["inventory"] == [entry]

    late = publish_new_category(category="inventory", registry=str(registry), root=str(root), config=cfg)
    assert late is None and _state(root, registry)["published"]["inventory"] == now


def test_a_failing_zero_shot_step_does_not_stop_the_retrain(workspace, tmp_path):
    """Serving early is best effort: a current generator that cannot be read (its sidecar lost) costs the zero-shot
    adapter, not the retrain."""
    from icm_core.infra.io import sidecar_path

    tv = workspace.config.task_vector.model_copy(update={"hidden_from": "base"})
    cfg = workspace.config.model_copy(update={"task_vector": tv})
    registry, root = _registry(tmp_path), workspace.root
    first = retrain_categories(registry=str(registry), root=str(root), config=cfg, baseline=True)
    sidecar_path(first["generator"]).unlink()
    add_category(registry, "inventory", inventory_text())

    out = retrain_categories(category="inventory", change="added", registry=str(registry), root=str(root), config=cfg)

    assert out["zero_shot"] is None and out["generator"] != first["generator"]
    assert _state(root, registry)["published"]["inventory"]["source"] == "retrained"
