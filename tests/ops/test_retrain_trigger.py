"""Registry change -> scan -> Prefect event -> deployment trigger -> incremental retraining, on a real server.

The retrain deployment and its trigger come from the repository's ``prefect.yaml`` (only its config is this
test's tiny one); a real process worker runs the triggered flow run in its own process.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH

from flows.pipeline import icm_pipeline
from flows.retrain import scan_categories
from icm_core.infra.confinement import REGISTRIES_ENV, ROOTS_ENV
from tests.flows.support import expected_task_runs, forecast_text, recipe_text, tiny_run_config
from tests.live_server import PREFECT, REPO, stop
from tests.ops.support import add_category, inventory_text, subflow_task_states, wait_for_run


pytestmark = pytest.mark.timeout(900)

RETRAIN = "on-category-change"


def deploy_retrain(live_server, tmp_path: Path, config: dict) -> tuple:
    """Deploy the repository's retrain deployment (trigger included) with ``config`` as its run config."""
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text(encoding="utf-8"))
    [deployment] = [d for d in spec["deployments"] if d["name"] == RETRAIN]
    deployment["parameters"] = {**deployment["parameters"], "config": config}
    spec["deployments"] = [deployment]
    prefect_file = tmp_path / "prefect.yaml"
    prefect_file.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    pool = deployment["work_pool"]["name"]
    live_server.cli("work-pool", "create", pool, "--type", "process", "--overwrite")
    live_server.cli("deploy", "--prefect-file", str(prefect_file), "--all", "--no-prompt", timeout=300)
    with get_client(sync_client=True) as client:
        return client.read_deployment_by_name(f"icm-retrain/{RETRAIN}"), pool


def test_new_category_retrains_only_that_category(live_server, tiny_base_dir, tmp_path):
    registry, root = tmp_path / "registry", tmp_path / "artifacts"
    results = root / ".prefect" / "results"
    add_category(registry, "recipes", recipe_text())
    add_category(registry, "forecast", forecast_text())
    config = tiny_run_config(tiny_base_dir)
    settings = {PREFECT_RESULTS_LOCAL_STORAGE_PATH: results}

    with live_server.connected(settings):
        # 1. The existing categories are trained, and the scan records them as the baseline.
        first = icm_pipeline(config=config, categories_file=str(registry), root=str(root), return_state=True)
        assert first.is_completed(), first.message
        baseline = scan_categories(registry=str(registry), root=str(root), baseline=True)
        assert sorted(baseline["categories"]) == ["forecast", "recipes"]
        deployment, pool = deploy_retrain(live_server, tmp_path, config.model_dump(mode="json"))

    # 2. A process worker for the deployment's pool; its flow runs share this test's result storage, and may use
    # this test's root and registry (a deployment run's paths are confined: icm_core/infra/confinement.py).
    worker = live_server.spawn(
        [PREFECT, "worker", "start", "--pool", pool, "--type", "process", "--limit", "1"],
        tmp_path / "worker.log",
        PREFECT_RESULTS_LOCAL_STORAGE_PATH=str(results),
        PREFECT_WORKER_QUERY_SECONDS="1",
        **{ROOTS_ENV: str(root), REGISTRIES_ENV: str(registry)},
    )
    try:
        with live_server.connected(settings):
            # 3. A category appears in the registry; the next scan emits icm.category.added.
            add_category(registry, "inventory", inventory_text())
            assert scan_categories(registry=str(registry), root=str(root))["added"] == ["inventory"]
            run = wait_for_run(deployment.id, {"category": "inventory", "change": "added"})
            assert run.state.is_completed(), f"{run.state}: see {tmp_path / 'worker.log'}"
            states = subflow_task_states(run.id)

            assert set(states) == expected_task_runs(("recipes", "forecast", "inventory"))
            # Only the new category is fine-tuned and embedded; the others' stages come from the cache, and so do
            # the references built from one category's own checkpoints (trajectory mean, own-trajectory soup). The
            # generators, samples and their evaluations are rebuilt for every category.
            old = {f"{stage}-{c}" for c in ("recipes", "forecast") for stage in ("data", "lora", "task-vector")}
            old |= {f"trajectory-mean-{c}" for c in ("recipes", "forecast")}
            old |= {f"soup-{c}-own" for c in ("recipes", "forecast")}
            methods = ("base", "lora", "trajectory_mean", "soup_own")
            old |= {f"eval-{c}-{m}" for c in ("recipes", "forecast") for m in methods}
            # The new category's splits come from the cache as well: the selector's publication, which runs before
            # the pipeline (flows/publish.py), prepared them to score its candidates on the train split.
            old |= {"data-inventory"}
            assert {n for n, s in states.items() if n.startswith("lora-") and s == "Completed"} == {"lora-inventory"}
            assert {n: states[n] for n in old} == dict.fromkeys(old, "Cached")
            rebuilt = set(states) - old
            assert {n: states[n] for n in rebuilt} == dict.fromkeys(rebuilt, "Completed")

            # 4. A category is removed: the generator is retrained on the rest, nothing is fine-tuned.
            (registry / "forecast.yaml").unlink()
            assert scan_categories(registry=str(registry), root=str(root))["removed"] == ["forecast"]
            run = wait_for_run(deployment.id, {"category": "forecast", "change": "removed"})
            assert run.state.is_completed(), f"{run.state}: see {tmp_path / 'worker.log'}"
            states = subflow_task_states(run.id)
            assert not any("forecast" in name for name in states), states
            assert {states[f"lora-{c}"] for c in ("recipes", "inventory")} == {"Cached"}
            assert states["train-generator"] == "Completed"
    finally:
        stop(worker)
    assert len(list(root.glob("generator/*/manifest.json"))) == 3  # baseline, +inventory, -forecast
