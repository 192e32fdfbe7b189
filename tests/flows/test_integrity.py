"""Integrity on reuse: a truncated artifact, a lost manifest and a torn Prefect result record are each detected
on the next run; the broken output is rebuilt (byte-identical), the intact one reused, the results unchanged.
(tests/flows/test_cache.py covers a flipped byte and a deleted file.)"""

from __future__ import annotations

import hashlib
from pathlib import Path

from tests.flows.support import expected_task_runs, states_by_name


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_truncated_artifact_lost_manifest_and_torn_record(workspace):
    first = workspace.run()
    assert first.is_completed(), first.message
    root = workspace.root

    # 1) The generator file cut in half, as a full disk or a copy that stopped would leave it.
    [generator] = root.glob("generator/*/generator.safetensors")
    generator_sha = sha256(generator)
    data = generator.read_bytes()
    generator.write_bytes(data[: len(data) // 2])
    # 2) One evaluation's manifest lost: its folder can no longer prove it is complete.
    [eval_manifest] = [m for m in root.glob("eval/forecast/*/manifest.json") if '"method": "base"' in m.read_text()]
    metrics_sha = sha256(eval_manifest.parent / "metrics.json")
    eval_manifest.unlink()
    # 3) Prefect's result record of a finished LoRA torn (Prefect writes records in place, not atomically).
    [lora_manifest] = root.glob("lora/recipes/*/manifest.json")
    lora_files = {p: p.stat().st_mtime_ns for p in lora_manifest.parent.rglob("*")}
    [record] = workspace.results.glob(f"{lora_manifest.parent.name}*")
    record.write_bytes(record.read_bytes()[:40])

    second = workspace.run()
    assert second.is_completed(), second.message
    states = states_by_name(second)
    assert set(states) == expected_task_runs()
    redone = {"train-generator", "eval-forecast-base", "lora-recipes"}
    assert {name: s for name, s in states.items() if s != "Cached"} == dict.fromkeys(redone, "Completed")
    # The truncated and the unproven outputs were rebuilt byte for byte; the LoRA behind the torn record was
    # complete, so it was reused as it was (not retrained), and its record written again.
    assert sha256(generator) == generator_sha
    assert eval_manifest.is_file() and sha256(eval_manifest.parent / "metrics.json") == metrics_sha
    assert {p: p.stat().st_mtime_ns for p in lora_manifest.parent.rglob("*")} == lora_files
    assert second.result()["rows"] == first.result()["rows"]
    assert set(states_by_name(workspace.run()).values()) == {"Cached"}
