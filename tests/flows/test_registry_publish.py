"""The retrain flow serves a newly added category in three stages: at once the selector's choice among the library's
adapters (chosen on the category's own samples), then its own fine-tuned LoRA when the retrain is done, or the
retrained generator's adapter where ``serving.after_finetune=generator`` chooses storage over quality.

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


def _text_config(workspace, **serving):
    tv = workspace.config.task_vector.model_copy(update={"hidden_from": "base"})
    update = {"task_vector": tv}
    if serving:
        update["serving"] = workspace.config.serving.model_copy(update=serving)
    return workspace.config.model_copy(update=update)


def _table(artifact) -> list[dict]:
    return json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data


def test_a_new_category_is_served_by_the_selector_then_by_its_own_fine_tune(workspace, tmp_path):
    cfg = _text_config(workspace)
    registry, root = _registry(tmp_path), workspace.root

    first = retrain_categories(registry=str(registry), root=str(root), config=cfg, baseline=True)
    assert first["zero_shot"] is None  # a baseline run adds nothing early: every category has its own fine-tune
    section = _state(root, registry)
    assert {n: e["source"] for n, e in section["published"].items()} == {
        "recipes": "fine-tuned",
        "forecast": "fine-tuned",
    }
    assert {n: e["adapter_dir"] for n, e in section["published"].items()} == first["lora_adapters"]

    add_category(registry, "inventory", inventory_text())
    started = datetime.now(timezone.utc)
    state = retrain_categories(
        category="inventory", change="added", registry=str(registry), root=str(root), config=cfg, return_state=True
    )
    assert state.is_completed(), state.message
    out = state.result()

    # 1. The selector's choice, within a minute of the run's start and before the category's fine-tune finished:
    #    among the library's LoRAs, their mean, a fine-tune from the mean and the old generator's z draws.
    early = out["zero_shot"]
    assert early["source"] == "selected"
    assert early["generator"] == first["generator"] and early["generator_categories"] == ["forecast", "recipes"]
    published_at = datetime.fromisoformat(early["published_at"])
    assert (published_at - started).total_seconds() < 60
    [lora_manifest] = root.glob("lora/inventory/*/manifest.json")
    assert published_at.timestamp() < lora_manifest.stat().st_mtime
    selection = json.loads((Path(early["adapter_dir"]) / "selection.json").read_text())
    names = {row["name"] for row in selection["scores"]}
    assert {"lora:forecast", "lora:recipes", "mean_lora", "icm_lora:z0", "finetune", "mix"} <= names
    lowest = min(row["nll"] for row in selection["scores"])
    [chosen] = [row for row in selection["scores"] if row["name"] == early["winner"] == selection["winner"]]
    assert chosen["nll"] <= lowest + cfg.serving.selector.tie_nats
    read_adapter(early["adapter_dir"])  # a standard PEFT folder

    # 2. Then its own fine-tuned LoRA; the registry state says which is published now.
    section = _state(root, registry)
    now = section["published"]["inventory"]
    assert now["source"] == "fine-tuned" and now["adapter_dir"] == out["lora_adapters"]["inventory"]
    assert section["history"]["inventory"] == [early]
    assert all(section["published"][c]["source"] == "fine-tuned" for c in ("recipes", "forecast"))

    # 3. The UI: the candidates' scores as a table, a note per publication, the table of what serves what.
    artifacts = _artifacts(state.state_details.flow_run_id)
    [scores] = artifacts["selector-inventory"]
    assert {row["candidate"] for row in _table(scores)} == names
    assert [row["candidate"] for row in _table(scores) if row["chosen"]] == [early["winner"]]
    notes = sorted(artifacts["published-inventory"], key=lambda a: a.created)
    assert ["selector" in notes[0].data, "fine-tuned" in notes[-1].data] == [True, True]
    tables = sorted(artifacts["registry-published"], key=lambda a: a.created)
    assert {row["category"]: row["source"] for row in _table(tables[0])}["inventory"] == "selected"
    assert {row["source"] for row in _table(tables[-1])} == {"fine-tuned"}

    # 4. A later scan keeps what was published (it rewrites only its own part of the state).
    assert scan_categories(registry=str(registry), root=str(root))["added"] == ["inventory"]
    assert _state(root, registry)["published"]["inventory"] == now


def test_storage_over_quality_serves_the_retrained_generator_after_the_selector(workspace, tmp_path):
    cfg = _text_config(workspace, after_finetune="generator")
    registry, root = _registry(tmp_path), workspace.root
    retrain_categories(registry=str(registry), root=str(root), config=cfg, baseline=True)
    assert {e["source"] for e in _state(root, registry)["published"].values()} == {"retrained"}
    add_category(registry, "inventory", inventory_text())

    out = retrain_categories(category="inventory", change="added", registry=str(registry), root=str(root), config=cfg)

    assert out["zero_shot"]["source"] == "selected"
    now = _state(root, registry)["published"]["inventory"]
    assert now["source"] == "retrained" and sorted(now["generator_categories"]) == ["forecast", "inventory", "recipes"]
    assert now["adapter_dir"] == next(r["adapter_dir"] for r in out["rows"] if r["category"] == "inventory")


def test_a_generator_on_finetuned_vectors_leaves_the_library_loras_as_candidates(workspace, tmp_path):
    """The paper's (and the demo's) fine-tuned-model vectors need the new category's fine-tune: its generator gives
    no candidate, the library's own LoRAs still do."""
    assert workspace.config.task_vector.hidden_from == "finetuned"
    registry, root = _registry(tmp_path), workspace.root
    retrain_categories(registry=str(registry), root=str(root), config=workspace.config, baseline=True)
    add_category(registry, "inventory", inventory_text())

    out = retrain_categories(
        category="inventory", change="added", registry=str(registry), root=str(root), config=workspace.config
    )

    early = out["zero_shot"]
    assert early["source"] == "selected" and early["generator"] is None
    selection = json.loads((Path(early["adapter_dir"]) / "selection.json").read_text())
    assert not any(row["name"].startswith("icm_lora") for row in selection["scores"])
    assert _state(root, registry)["published"]["inventory"]["source"] == "fine-tuned"


def test_the_early_deployment_publishes_once_and_never_undoes_a_fine_tune(workspace, tmp_path):
    """``publish_new_category`` (the ``zero-shot-on-category-added`` deployment) publishes the same adapter the
    retrain flow would; a second or late run publishes nothing over it or over the fine-tuned adapter."""
    cfg = _text_config(workspace)
    registry, root = _registry(tmp_path), workspace.root
    retrain_categories(registry=str(registry), root=str(root), config=cfg, baseline=True)
    add_category(registry, "inventory", inventory_text())

    entry = publish_new_category(category="inventory", registry=str(registry), root=str(root), config=cfg)
    assert entry["source"] == "selected" and not list(root.glob("lora/inventory"))  # no fine-tune yet
    assert _state(root, registry)["published"]["inventory"] == entry
    assert publish_new_category(category="inventory", registry=str(registry), root=str(root), config=cfg) is None
    assert publish_new_category(category="inventory", change="removed", registry=str(registry), root=str(root)) is None

    out = retrain_categories(category="inventory", change="added", registry=str(registry), root=str(root), config=cfg)
    assert out["zero_shot"] is None  # already published by the deployment: the same cached adapter
    now = _state(root, registry)["published"]["inventory"]
    assert now["source"] == "fine-tuned" and _state(root, registry)["history"]["inventory"] == [entry]

    late = publish_new_category(category="inventory", registry=str(registry), root=str(root), config=cfg)
    assert late is None and _state(root, registry)["published"]["inventory"] == now


def test_a_failing_early_step_does_not_stop_the_retrain(workspace, tmp_path):
    """Serving early is best effort: a current generator that cannot be read (its sidecar lost) costs the early
    adapter, not the retrain."""
    from icm_core.infra.io import sidecar_path

    cfg = _text_config(workspace)
    registry, root = _registry(tmp_path), workspace.root
    first = retrain_categories(registry=str(registry), root=str(root), config=cfg, baseline=True)
    sidecar_path(first["generator"]).unlink()
    add_category(registry, "inventory", inventory_text())

    out = retrain_categories(category="inventory", change="added", registry=str(registry), root=str(root), config=cfg)

    assert out["zero_shot"] is None and out["generator"] != first["generator"]
    assert _state(root, registry)["published"]["inventory"]["source"] == "fine-tuned"
