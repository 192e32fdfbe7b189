"""A pipeline run killed by SIGKILL is marked Crashed by a real server (heartbeats + the project's zombie
automation, flows/zombies.py), and a restart is a new run that completes.

Heartbeats every 30 s (Prefect's minimum) and 45 s of silence for the automation: the project's defaults are
60 s and 180 s; only the intervals are shortened here."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

from flows.zombies import AUTOMATION_NAME, ensure_zombie_automation
from tests.flows.support import forecast_text, pipeline_args, recipe_text, tiny_run_config, write_categories
from tests.live_server import REPO


pytestmark = pytest.mark.timeout(900)

HEARTBEAT_S = 30
WITHIN_S = 45


def flow_run_named(name: str):
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))
    return runs


def wait_for(predicate, timeout: float, what: str, poll: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"{what} after {timeout:.0f} s")


def test_sigkilled_run_is_marked_crashed_and_restart_is_a_new_run(live_server, tiny_base_dir, tmp_path):
    root = tmp_path / "artifacts"
    categories = write_categories(tmp_path / "data", {"recipes": recipe_text(), "forecast": forecast_text()})
    config = tiny_run_config(tiny_base_dir, steps=3000)  # long enough to still be training when killed
    command = [
        sys.executable, "-m", "flows.cli", "pipeline", *pipeline_args(root, config, categories, tmp_path), "--only",
        "recipes",
    ]  # fmt: skip
    env = live_server.env(PREFECT_FLOWS_HEARTBEAT_FREQUENCY=str(HEARTBEAT_S))

    with live_server.connected():
        automation = ensure_zombie_automation(WITHIN_S)
        assert automation.name == AUTOMATION_NAME
        again = ensure_zombie_automation(WITHIN_S)  # idempotent: replaces, never duplicates
        from prefect.automations import Automation

        assert Automation.read(name=AUTOMATION_NAME).id == again.id

        log = tmp_path / "killed.log"
        with log.open("wb") as out:
            process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            run = wait_for(
                lambda: next((r for r in flow_run_named("icm-pipeline-recipes") if r.state_name == "Running"), None),
                240,
                "no Running pipeline run on the server",
            )
            wait_for(lambda: list(root.glob("lora/recipes/*")), 240, "the LoRA never started", poll=0.5)
            time.sleep(3)  # the first heartbeat is sent when the run starts; let it reach the server
            os.kill(process.pid, signal.SIGKILL)
            assert process.wait(timeout=30) == -signal.SIGKILL
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        killed_at = time.monotonic()

        def crashed():
            [current] = [r for r in flow_run_named("icm-pipeline-recipes") if r.id == run.id]
            return current if current.state_name == "Crashed" else None

        crashed_run = wait_for(crashed, 240, f"run {run.id} not marked Crashed (log: {log})", poll=2)
        waited = time.monotonic() - killed_at
        assert "heartbeat" in (crashed_run.state.message or ""), crashed_run.state.message
        print(f"marked Crashed {waited:.0f} s after the kill")

    # The restart is a new flow run; it completes and the killed run stays Crashed.
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with live_server.connected():
        runs = {r.id: r.state_name for r in flow_run_named("icm-pipeline-recipes")}
    assert runs[run.id] == "Crashed"
    assert sorted(state for rid, state in runs.items() if rid != run.id) == ["Completed"]
