"""A pipeline killed mid-run (SIGKILL, a real separate process) resumes from its finished artifacts and ends
with exactly the metrics of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

from tests.flows.support import CATEGORIES, EVALUATED, states_by_name


REPO = Path(__file__).resolve().parents[2]
KILL_DEADLINE_S = 240


def final_scores(root: Path) -> dict[tuple[str, str], tuple[float, float]]:
    """Unrounded (ppl, bpc) per (category, method), read from the eval manifests under ``root``."""
    scores = {}
    for manifest in root.glob("eval/*/*/manifest.json"):
        meta = json.loads(manifest.read_text())["meta"]
        key = (manifest.parent.parent.name, meta["method"])
        assert key not in scores, f"two eval outputs for {key} under {root}"
        scores[key] = (meta["ppl"], meta["bpc"])
    return scores


def recorded(results: Path, manifest: Path) -> bool:
    """Whether Prefect has persisted the cache record of the task run that wrote ``manifest``'s folder
    (records are named by the full cache key; the folder by its first 16 characters)."""
    for record in results.glob(f"{manifest.parent.name}*"):
        try:
            json.loads(record.read_bytes())
        except ValueError:  # still being written
            continue
        return True
    return False


def test_killed_run_resumes_with_same_metrics(workspace, prefect_api, tmp_path):
    # More LoRA steps than elsewhere (~2 s per category), so the second category is still training when the
    # first one has finished and been recorded.
    config = workspace.config.model_copy(update={"lora": workspace.config.lora.model_copy(update={"steps": 200})})
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_api,
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(workspace.results),
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "DO_NOT_TRACK": "1",
    }
    log = tmp_path / "killed-run.log"
    command = [sys.executable, "-m", "flows.cli", "pipeline", *workspace.pipeline_args(tmp_path, config)]
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + KILL_DEADLINE_S
            finished: list[Path] = []
            while time.monotonic() < deadline and process.poll() is None:
                finished = [m for m in workspace.root.glob("lora/*/*/manifest.json") if recorded(workspace.results, m)]
                if finished:
                    break
                time.sleep(0.01)
            generator_done = any(workspace.root.glob("generator/*/manifest.json"))
            if process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)
            returncode = process.wait(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    output = log.read_text(errors="replace")[-4000:]
    assert finished, f"no LoRA finished before the deadline / exit (rc {process.returncode}):\n{output}"
    assert returncode == -signal.SIGKILL, f"the run ended on its own (rc {returncode}) before the kill:\n{output}"
    assert not generator_done, "the generator was already trained when the run was killed"
    loras_at_kill = list(workspace.root.glob("lora/*/*/manifest.json"))
    assert len(loras_at_kill) < len(CATEGORIES), "every LoRA had finished: the kill came too late to test resuming"

    done_manifest = finished[0]
    done_category = done_manifest.parent.parent.name
    done_mtime = done_manifest.stat().st_mtime_ns
    checkpoints = {p: p.stat().st_mtime_ns for p in done_manifest.parent.glob("checkpoint-*.safetensors")}

    resumed = workspace.run(config=config)
    assert resumed.is_completed(), resumed.message
    states = states_by_name(resumed)
    # The LoRA the killed run finished (and recorded) is a cache hit, its files untouched; the one it was
    # training is trained again from scratch.
    other = next(c for c in CATEGORIES if c != done_category)
    assert states[f"lora-{done_category}"] == "Cached"
    assert states[f"lora-{other}"] == "Completed"
    assert done_manifest.stat().st_mtime_ns == done_mtime
    assert {p: p.stat().st_mtime_ns for p in checkpoints} == checkpoints
    assert len(list(workspace.root.glob("lora/*/*/manifest.json"))) == len(CATEGORIES)

    reference_root = tmp_path / "uninterrupted"
    with temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: reference_root / ".prefect" / "results"}):
        reference = workspace.run(config=config, root=reference_root)
    assert reference.is_completed(), reference.message

    got, want = final_scores(workspace.root), final_scores(reference_root)
    assert set(got) == {(c, m) for c in CATEGORIES for m in EVALUATED}
    assert set(want) == set(got)
    for key in sorted(want):
        assert abs(got[key][0] - want[key][0]) <= 1e-9 * max(1.0, abs(want[key][0])), (key, got[key], want[key])
        assert abs(got[key][1] - want[key][1]) <= 1e-9, (key, got[key], want[key])
    rows = {r["category"]: r for r in resumed.result()["rows"]}
    reference_rows = {r["category"]: r for r in reference.result()["rows"]}
    for name in CATEGORIES:
        for column in ("ppl_base", "ppl_lora", "ppl_icm_lora", "bpc_base", "bpc_lora", "bpc_icm_lora"):
            assert rows[name][column] == reference_rows[name][column], (name, column)
