"""Resume *inside* long stages: a pipeline process SIGKILLed in the middle of a LoRA fine-tune or of the CVAE
training continues, on restart, from the stage's last saved state (its log says so) and ends with outputs
byte-identical to an uninterrupted run; the saved state is gone once the outputs are complete."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest
from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

from icm_core.infra.config import ResumeConfig
from icm_core.infra.faults import KILL_ENV, MARKER_ENV, TRACE_ENV
from tests.flows.crash import log_tail, run_pipeline_process
from tests.flows.support import Workspace, forecast_text, recipe_text, tiny_run_config, write_categories
from tests.flows.test_faults import eval_scores, weight_hashes


RESUME = ResumeConfig(lora_every_steps=4, cvae_every_epochs=2, pdiff_every_epochs=1, pdiff_every_steps=2)


def resumable_config(tiny_base_dir):
    """12 LoRA steps (state every 4, checkpoints 8/10/12 kept), 7 CVAE epochs (state every 2)."""
    config = tiny_run_config(tiny_base_dir, steps=12, trajectory_size=3, checkpoint_every=2)
    return config.model_copy(update={"cvae": config.cvae.model_copy(update={"epochs": 7}), "resume": RESUME})


@pytest.fixture(scope="module")
def uninterrupted(prefect_api, tmp_path_factory, tiny_base_dir) -> Iterator[dict]:
    base = tmp_path_factory.mktemp("uninterrupted")
    root = base / "artifacts"
    categories = write_categories(base / "data", {"recipes": recipe_text(), "forecast": forecast_text()})
    config = resumable_config(tiny_base_dir)
    with temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: root / ".prefect" / "results"}):
        state = Workspace(root, root / ".prefect" / "results", categories, config).run()
    assert state.is_completed(), state.message
    yield {"weights": weight_hashes(root), "scores": eval_scores(root)}


CASES = [
    # LoRA of 'recipes' killed after step 10: states at steps 4 and 8 were saved (8 holds checkpoint 8).
    ("lora.step@*/lora/recipes/*#10", "lora: resuming from step 8", "lora/recipes"),
    # CVAE killed after its 5th epoch: the state of epoch 4 was saved.
    ("cvae.epoch#5", "generator: resuming from epoch 4", "generator"),
]


@pytest.mark.parametrize("spec, message, stage", CASES, ids=["mid-finetune", "mid-cvae"])
def test_killed_stage_resumes_from_saved_state(
    spec, message, stage, workspace, prefect_api, uninterrupted, tiny_base_dir, tmp_path
):
    config = resumable_config(tiny_base_dir)
    argv = workspace.pipeline_args(tmp_path, config)
    marker, trace = tmp_path / "marker.txt", tmp_path / "trace.txt"

    killed_log = tmp_path / "killed.log"
    env = {KILL_ENV: spec, MARKER_ENV: str(marker)}
    code = run_pipeline_process(argv, prefect_api, workspace.results, env, killed_log)
    assert code == -signal.SIGKILL, f"run ended with {code}, not SIGKILL:\n{log_tail(killed_log)}"
    states = list(workspace.root.glob(f"{stage}/.*.resume/state-*.safetensors"))
    assert len(states) == 1, f"no saved state under {stage}: {list(workspace.root.rglob('.*.resume'))}"

    restart_log = tmp_path / "restart.log"
    code = run_pipeline_process(argv, prefect_api, workspace.results, {TRACE_ENV: str(trace)}, restart_log)
    assert code == 0, log_tail(restart_log)
    assert message in restart_log.read_text(errors="replace"), log_tail(restart_log)
    point = "lora.step" if stage.startswith("lora") else "cvae.epoch"
    target = "/lora/recipes/" if stage.startswith("lora") else ""
    hits = [line for line in trace.read_text().splitlines() if f" {point} " in line and target in line]
    remaining = 12 - 8 if stage.startswith("lora") else 7 - 4
    assert len(hits) == remaining, f"the restart ran {len(hits)} {point} steps, not the {remaining} after the state"

    # Byte-identical to the uninterrupted run, and the resumable state is removed.
    assert weight_hashes(workspace.root) == uninterrupted["weights"]
    assert eval_scores(workspace.root) == uninterrupted["scores"]
    assert not list(workspace.root.rglob(".*.resume")), "resumable state left after completion"
