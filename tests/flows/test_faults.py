"""Fault injection: SIGKILL the pipeline at many points, restart it, and get exactly the uninterrupted results.

Each case runs the pipeline CLI in its own process with ``ICM_FAULT_KILL_AT`` naming a crash point
(icm_core/infra/faults.py), checks that the process died by SIGKILL at that point, that no truncated or
half-written file sits under a final name, then restarts the pipeline on the same artifacts root and
compares every metric and every weight file with one uninterrupted seeded run.
"""

from __future__ import annotations

import hashlib
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

from icm_core.infra.faults import KILL_ENV, MARKER_ENV, parse_spec
from tasks.manifest import MANIFEST, valid_output
from tests.flows.crash import (
    check_visible_files,
    hidden_leftovers,
    log_tail,
    output_folders,
    run_pipeline_process,
)
from tests.flows.support import (
    CATEGORIES,
    EVALUATED,
    Workspace,
    expected_output_folders,
    expected_task_runs,
    forecast_text,
    recipe_text,
    states_by_name,
    tiny_run_config,
    write_categories,
)


# (spec, what the crash interrupts). Globs match the target path; '#n' picks the n-th hit; '~torn' leaves the
# temporary file half-written, as a crash in the middle of writing it would.
KILL_POINTS = [
    ("io.before_rename@*/data/*/splits/*.jsonl#2", "mid data-split write"),
    ("lora.step#3", "mid LoRA training (step 3 of the first category)"),
    ("io.before_rename@*/checkpoint-000002.safetensors~torn", "mid checkpoint write (torn temporary file)"),
    ("io.before_sidecar@*/checkpoint-000004.safetensors", "checkpoint in place, sha256 sidecar not written"),
    ("io.folder_before_rename@*/lora/*/adapter", "mid write of the final LoRA adapter folder"),
    ("stage.before_manifest@*/lora/*", "LoRA artifact complete, manifest not written"),
    ("io.before_rename@*/task_vectors/*/task_vector.safetensors~torn", "mid task-vector write"),
    ("cvae.epoch#2", "mid CVAE training (after epoch 2)"),
    ("io.before_rename@*/generator.safetensors~torn", "mid generator write"),
    ("stage.after_manifest@*/generator/*", "generator and manifest written, Prefect result not recorded"),
    ("io.folder_before_rename@*/adapters/*/adapter", "mid write of a generated adapter folder"),
    ("evaluate.batch#4", "mid evaluation (the 4th evaluation)"),
    ("io.before_rename@*/eval/*/metrics.json", "mid write of evaluation metrics"),
    ("io.before_rename@*/manifest.json#7~torn", "mid manifest write (the 7th manifest, torn)"),
    ("io.before_rename@*/report/*/report.md", "mid report write"),
    ("io.before_rename@*/latest.json", "mid write of latest.json (the very end)"),
]


def eval_scores(root: Path) -> dict[tuple[str, str], tuple[float, float]]:
    """Unrounded (ppl, bpc) per (category, method), from the eval manifests under ``root``."""
    scores = {}
    for manifest in root.glob(f"eval/*/*/{MANIFEST}"):
        meta = json.loads(manifest.read_text())["meta"]
        key = (manifest.parent.parent.name, meta["method"])
        assert key not in scores, f"two eval outputs for {key} under {root}"
        scores[key] = (meta["ppl"], meta["bpc"])
    return scores


def weight_hashes(root: Path) -> dict[str, list[str]]:
    """sha256 of every data split and weight file (everything that holds no absolute path), keyed by
    ``stage/category/file`` without the root-dependent key folder; a stage with several outputs per category
    (the z draws of a generator) gives the sorted list of their hashes."""
    hashes: dict[str, list[str]] = {}
    for folder in output_folders(root):
        parts = folder.relative_to(root).parts
        if parts[0] in ("eval", "report"):
            continue
        label = "/".join(parts[:-1])
        for path in folder.rglob("*"):
            if path.is_file() and path.name != MANIFEST and not path.name.startswith("."):
                key = f"{label}/{path.relative_to(folder).as_posix()}"
                hashes.setdefault(key, []).append(hashlib.sha256(path.read_bytes()).hexdigest())
    return {key: sorted(values) for key, values in hashes.items()}


def report_numbers(root: Path) -> list[dict]:
    rows = json.loads(next(root.glob("report/*/results.json")).read_text())["rows"]
    return [{k: v for k, v in row.items() if k != "adapter_dir"} for row in rows]


@pytest.fixture(scope="module")
def reference(prefect_api, tmp_path_factory, tiny_base_dir) -> Iterator[dict]:
    """One uninterrupted seeded run, shared by every case: its metrics, weight hashes and report numbers."""
    base = tmp_path_factory.mktemp("reference")
    root = base / "artifacts"
    categories = write_categories(base / "data", {"recipes": recipe_text(), "forecast": forecast_text()})
    with temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: root / ".prefect" / "results"}):
        state = Workspace(root, root / ".prefect" / "results", categories, tiny_run_config(tiny_base_dir)).run()
    assert state.is_completed(), state.message
    scores = eval_scores(root)
    assert set(scores) == {(c, m) for c in CATEGORIES for m in EVALUATED}
    yield {"scores": scores, "weights": weight_hashes(root), "report": report_numbers(root)}


@pytest.mark.parametrize("spec, what", KILL_POINTS, ids=[spec for spec, _ in KILL_POINTS])
def test_kill_and_restart_gives_uninterrupted_results(spec, what, workspace, prefect_api, reference, tmp_path):
    argv = workspace.pipeline_args(tmp_path)
    marker, log = tmp_path / "fault-marker.txt", tmp_path / "killed-run.log"

    # 1) The run dies by SIGKILL at the requested point (the marker is written just before the kill).
    started = time.perf_counter()
    code = run_pipeline_process(argv, prefect_api, workspace.results, {KILL_ENV: spec, MARKER_ENV: str(marker)}, log)
    killed_after = time.perf_counter() - started
    assert code == -signal.SIGKILL, f"{what}: run ended with {code}, not SIGKILL:\n{log_tail(log)}"
    point = parse_spec(spec)[0]
    assert marker.read_text().startswith(f"{point} "), marker.read_text()

    # 2) What the crash left: complete files under final names, partial ones only under hidden temporary names.
    check_visible_files(workspace.root)
    complete_at_kill = {
        folder: {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
        for folder in output_folders(workspace.root)
        if valid_output(folder) is not None
    }
    torn = [p for p in hidden_leftovers(workspace.root) if p.is_file() and p.suffix == ".tmp"]
    if spec.endswith("~torn"):
        assert torn, f"{what}: no torn temporary file was left"

    # 3) The restart completes; nothing finished before the crash is redone, nothing partial is used.
    state = workspace.run()
    assert state.is_completed(), f"{what}: restart failed: {state.message}"
    states = states_by_name(state)
    assert set(states) == expected_task_runs()
    for folder, mtimes in complete_at_kill.items():
        assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == mtimes, f"{folder} was rebuilt"
    counts = check_visible_files(workspace.root)
    assert counts["manifests"] == expected_output_folders()
    assert all(valid_output(folder) is not None for folder in output_folders(workspace.root))
    leftovers = hidden_leftovers(workspace.root)
    assert all(p.parent == workspace.root for p in leftovers), f"temporary files left in outputs: {leftovers}"
    assert not any(p.exists() for p in torn if p.parent != workspace.root)

    # 4) Identical to the uninterrupted run: every metric, every weight file, the report's numbers.
    assert eval_scores(workspace.root) == reference["scores"]
    assert weight_hashes(workspace.root) == reference["weights"]
    assert report_numbers(workspace.root) == reference["report"]
    print(f"{spec}: killed after {killed_after:.1f} s; {len(complete_at_kill)} outputs complete at the kill")
