"""An fsspec artifacts root: outputs are published there, and a machine with a fresh local cache reuses them."""

from __future__ import annotations

import shutil
import uuid

import fsspec
import pytest
from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

from flows.generate import latest_generator
from icm_core.infra.io import ArtifactError, read_json
from tasks.artifacts import ArtifactRef, localize
from tasks.store import CACHE_ENV, local_root, normalize_root
from tests.flows.support import expected_output_folders, expected_task_runs, states_by_name


def published(url: str) -> dict[str, object]:
    """``{path: creation time}`` of every file under a memory:// root (a republished file gets a new time)."""
    fs, base = fsspec.core.url_to_fs(url)
    return {path: info["created"] for path, info in fs.find(base, detail=True).items()}


def metrics(state) -> list[dict]:
    """The result rows of a pipeline run without the (machine-local) adapter folders."""
    return [{k: v for k, v in row.items() if k != "adapter_dir"} for row in state.result()["rows"]]


def test_fresh_machine_reuses_published_artifacts(workspace, tmp_path, monkeypatch):
    url = f"memory://icm-{uuid.uuid4().hex[:8]}/artifacts"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "machine-a"))
    first = workspace.run(root=url)
    assert first.is_completed(), first.message
    before = published(url)
    manifests = sorted(p for p in before if p.endswith("/manifest.json"))
    assert len(manifests) == expected_output_folders()  # every stage output is published, manifest last
    assert any(p.endswith("/latest.json") for p in before)
    # Prefect's result records live inside the root they describe (tasks/result_records.py), not on this machine.
    records = [p for p in before if "/.prefect/results/" in p]
    assert len(records) >= len(expected_task_runs()), records

    # Another machine: its own staging cache and its own (empty) Prefect result storage.
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "machine-b"))
    machine_b = local_root(url)
    assert not machine_b.exists()
    with temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: tmp_path / "machine-b-results"}):
        second = workspace.run(root=url)
    assert second.is_completed(), second.message
    # The records in the root are the second machine's cache too: every output is published there, so every
    # task is a cache hit although this machine's staging cache is empty (the policy checks the published
    # manifest; consumers fetch and verify on demand).
    states = states_by_name(second)
    assert set(states) == expected_task_runs()
    assert set(states.values()) == {"Cached"}, states
    # Nothing was rebuilt: a rebuilt output would have been published again, with new file times. (Only
    # latest.json, the pointer to the run's results, is rewritten by every run.)
    after = published(url)
    pointer = next(p for p in before if p.endswith("/latest.json"))
    assert after.pop(pointer) > before.pop(pointer)
    assert after == before
    assert metrics(second) == metrics(first)

    # A lost published output is rebuilt, even though its record sits in the root: the policy finds neither a
    # local copy nor the published manifest and expires the record through Prefect's ResultStore.
    fs, _ = fsspec.core.url_to_fs(url)
    [lost] = [p for p in manifests if "/task_vectors/recipes/" in p]
    fs.rm(lost.rsplit("/", 1)[0], recursive=True)
    third = workspace.run(root=url)
    assert third.is_completed(), third.message
    states = states_by_name(third)
    assert {n: s for n, s in states.items() if s != "Cached"} == {"task-vector-recipes": "Completed"}, states
    assert fs.exists(lost)  # rebuilt (byte-identical, so nothing downstream changed) and published again
    assert metrics(third) == metrics(first)

    # A third machine generates adapters from the latest generator on the shared root (the second machine's
    # disk, where latest.json's path points, is not there).
    shutil.rmtree(machine_b)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "machine-c"))
    generator = latest_generator(url)
    assert generator.is_file() and generator.is_relative_to(local_root(url))


def test_corrupted_remote_output_is_rejected(tmp_path, monkeypatch):
    from tasks.manifest import write_manifest
    from tasks.store import publish

    url = f"memory://icm-{uuid.uuid4().hex[:8]}/root"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "a"))
    folder = local_root(url) / "data" / "demo" / "0123456789abcdef"
    folder.mkdir(parents=True)
    (folder / "splits.json").write_text('{"train": 1}')
    digest = write_manifest(folder, {})
    publish(normalize_root(url), folder, read_json(folder / "manifest.json"))
    ref = ArtifactRef(stage="data", category="demo", key="0123456789abcdef" * 4, path=str(folder), sha256=digest)

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "b"))
    assert localize(ref, url).file("splits.json").read_text() == '{"train": 1}'  # fetched and verified

    fs, base = fsspec.core.url_to_fs(url)
    fs.pipe_file(f"{base}/data/demo/0123456789abcdef/splits.json", b'{"train": 2}')
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "c"))
    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        localize(ref, url)
    assert not (local_root(url) / "data" / "demo" / "0123456789abcdef").exists()  # nothing half-fetched
