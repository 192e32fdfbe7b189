"""Task runners: the Dask runner (a real 2-worker local cluster) builds the same artifacts as the thread runner."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

from flows.pipeline import icm_pipeline
from flows.runtime import make_task_runner
from tests.flows.support import expected_output_folders, expected_task_runs, states_by_name


def manifests(root: Path) -> dict[tuple[str, ...], dict[str, str]]:
    """``{(stage, category, method): {file: sha256}}`` of every stage output under an artifacts root.

    Keys differ between roots (the root is part of them), so outputs are matched by stage and category.
    Text files that name output folders (evaluations record the adapter folder, the report lists adapter
    folders) are hashed with ``<root>/<stage>/<category>/<key>`` in place of those; other files by their
    manifest sha256. A stage with several outputs per category (the generators' extra z draws) gives one entry
    per output, numbered in the order of their file hashes.
    """
    found: dict[tuple[str, ...], list[dict[str, str]]] = {}
    for path in root.glob("**/manifest.json"):
        manifest = json.loads(path.read_text())
        # Drop the key folder; evaluations of one category differ by method.
        where = (*path.parent.relative_to(root).parts[:-1], manifest["meta"].get("method", ""))
        files = dict(manifest["files"])
        if where[0] == "report":
            # report.md and results.json also quote the generator's training time; results.csv holds every
            # metric and adapter of the report.
            files = {"results.csv": files["results.csv"]}
        for name in files:
            if name.endswith((".json", ".md", ".csv")):
                text = (path.parent / name).read_text(encoding="utf-8")
                text = re.sub(re.escape(str(root)) + r"(/[\w-]+/[\w-]+)/[0-9a-f]{16}", r"<root>\1/<key>", text)
                # Files also name outputs relative to the root (``adapters/<category>/<key>/adapter``).
                text = re.sub(r"(?<![\w/-])([\w-]+/[\w-]+)/[0-9a-f]{16}", r"<root>/\1/<key>", text)
                files[name] = hashlib.sha256(text.encode()).hexdigest()
        found.setdefault(where, []).append(files)
    return {
        (*where, str(i)): files
        for where, outputs in found.items()
        for i, files in enumerate(sorted(outputs, key=lambda f: json.dumps(f, sort_keys=True)))
    }


def test_unknown_runner_and_bad_options():
    with pytest.raises(ValueError, match="unknown task runner 'spark'"):
        make_task_runner("spark")
    with pytest.raises(ValueError, match="runner_address"):
        make_task_runner("threads", address="tcp://127.0.0.1:8786")


def run_with_runner(workspace, runner, root: Path):
    """The workspace's pipeline on ``runner`` into a fresh ``root`` (with its own Prefect result folder)."""
    with temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: root / ".prefect" / "results"}):
        return icm_pipeline.with_options(task_runner=runner)(
            config=workspace.config,
            categories_file=str(workspace.categories_file),
            root=str(root),
            return_state=True,
        )


@pytest.mark.timeout(600)
def test_dask_runner_matches_thread_runner(workspace, tmp_path):
    threads = workspace.run()
    assert threads.is_completed(), threads.message

    dask_root = tmp_path / "dask-artifacts"
    runner = make_task_runner("dask", workers=2)
    state = run_with_runner(workspace, runner, dask_root)
    assert state.is_completed(), state.message
    states = states_by_name(state)
    assert set(states) == expected_task_runs()
    assert set(states.values()) == {"Completed"}, states

    by_threads, by_dask = manifests(workspace.root), manifests(dask_root)
    assert set(by_dask) == set(by_threads)
    assert len(by_dask) == expected_output_folders()
    different = {
        where: sorted(f for f in by_threads[where] if by_threads[where][f] != by_dask[where].get(f))
        for where in by_threads
        if by_threads[where] != by_dask[where]
    }
    assert not different, f"outputs that differ between the thread and the Dask runner: {different}"


@pytest.mark.timeout(600)
def test_ray_runner_matches_thread_runner(workspace, tmp_path):
    """Runs only where the optional ``ray`` extra is installed (CI installs ``dev``, which has Dask only)."""
    pytest.importorskip("prefect_ray")
    threads = workspace.run()
    assert threads.is_completed(), threads.message
    ray_root = tmp_path / "ray-artifacts"
    runner = make_task_runner("ray", workers=2)
    state = run_with_runner(workspace, runner, ray_root)
    assert state.is_completed(), state.message
    assert manifests(ray_root) == manifests(workspace.root)
