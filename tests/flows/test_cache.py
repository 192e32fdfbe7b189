"""Cross-run caching of the pipeline: all hits on a rerun, precise invalidation, and self-healing artifacts."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from tests.flows.support import CATEGORIES, expected_task_runs, states_by_name


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_second_run_all_cache_hits(workspace):
    first = workspace.run()
    assert first.is_completed(), first.message
    first_states = states_by_name(first)
    assert set(first_states) == expected_task_runs()
    assert set(first_states.values()) == {"Completed"}, first_states

    second = workspace.run()
    assert second.is_completed(), second.message
    states = states_by_name(second)
    assert set(states) == expected_task_runs()
    assert {name for name, s in states.items() if s != "Cached"} == set(), states
    assert second.result() == first.result()


def test_cvae_config_change_reruns_only_cvae_and_downstream(workspace):
    assert workspace.run().is_completed()
    changed = workspace.config.model_copy(
        update={"cvae": workspace.config.cvae.model_copy(update={"epochs": workspace.config.cvae.epochs + 1})}
    )
    state = workspace.run(config=changed)
    assert state.is_completed(), state.message
    states = states_by_name(state)
    assert set(states) == expected_task_runs()
    upstream = {f"{stage}-{c}" for c in CATEGORIES for stage in ("data", "lora", "task-vector")}
    # The baselines do not depend on the CVAE config: Model Soup and COND P-DIFF come from the cache.
    baselines = {"soup-all", "train-cond-pdiff", "diagnostics-cond_pdiff", "sample-pdiff", "sample-pdiff-z1"}
    baselines |= {f"trajectory-mean-{c}" for c in CATEGORIES} | {f"soup-{c}-own" for c in CATEGORIES}
    methods = ("base", "lora", "trajectory_mean", "soup_own", "model_soup", "cond_pdiff")
    unaffected = upstream | baselines | {f"eval-{c}-{m}" for c in CATEGORIES for m in methods}
    rerun = {"train-generator", "report", "diagnostics-icm_lora"}
    rerun |= {f"sample-{c}{z}" for c in CATEGORIES for z in ("", "-z1")}
    rerun |= {f"eval-{c}-{m}" for c in CATEGORIES for m in ("icm_lora", "icm_lora@z1")}
    assert unaffected | rerun == set(states)
    assert {name: states[name] for name in unaffected} == dict.fromkeys(unaffected, "Cached")
    assert {name: states[name] for name in rerun} == dict.fromkeys(rerun, "Completed")
    # The new generator went to a new folder: the first run's generator is still there for its readers.
    assert len(list(workspace.root.glob("generator/*/manifest.json"))) == 2


def test_corrupted_artifact_is_recomputed(workspace):
    first = workspace.run()
    assert first.is_completed(), first.message
    [lora_dir] = workspace.root.glob("lora/recipes/*")
    checkpoint = sorted(lora_dir.glob("checkpoint-*.safetensors"))[0]
    original = sha256(checkpoint)
    data = bytearray(checkpoint.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped byte inside the tensor data: still a loadable file
    checkpoint.write_bytes(bytes(data))
    [vector] = workspace.root.glob("task_vectors/forecast/*/task_vector.safetensors")
    vector_sha = sha256(vector)
    vector.unlink()

    second = workspace.run()
    assert second.is_completed(), second.message
    states = states_by_name(second)
    assert set(states) == expected_task_runs()
    recomputed = {"lora-recipes", "task-vector-forecast"}
    assert {name: s for name, s in states.items() if s != "Cached"} == dict.fromkeys(recomputed, "Completed")
    # Training is deterministic, so the recomputed artifacts are byte-identical: everything downstream of
    # them keeps its cache key and stays a cache hit (asserted above).
    assert sha256(checkpoint) == original
    assert sha256(vector) == vector_sha
    assert second.result()["rows"] == first.result()["rows"]

    third = workspace.run()
    assert set(states_by_name(third).values()) == {"Cached"}


def test_lost_cache_record_reuses_complete_artifact(workspace):
    """A run killed after an artifact's manifest was written but before Prefect recorded the task's result:
    the next run misses the cache, finds the complete folder and reuses it instead of recomputing it."""
    assert workspace.run().is_completed()
    [manifest] = workspace.root.glob("lora/recipes/*/manifest.json")
    mtimes = {p: p.stat().st_mtime_ns for p in manifest.parent.rglob("*")}
    [record] = workspace.results.glob(f"{manifest.parent.name}*")
    record.unlink()

    state = workspace.run()
    assert state.is_completed(), state.message
    states = states_by_name(state)
    assert {name: s for name, s in states.items() if s != "Cached"} == {"lora-recipes": "Completed"}
    assert {p: p.stat().st_mtime_ns for p in manifest.parent.rglob("*")} == mtimes
    assert record.is_file()  # recorded again: the next run is a plain cache hit


def test_batched_pdiff_sampling_rebuilds_a_lost_category_bit_identically(workspace):
    """COND P-DIFF samples every category in one batch but keeps one folder per category: losing one category's
    folders invalidates the batch tasks' records; the rerun samples the same batch again, writes only the lost
    category's adapters, byte-identical to the lost ones, so nothing downstream reruns."""
    first = workspace.run()
    assert first.is_completed(), first.message
    manifests = {p.parent: json.loads(p.read_text()) for p in workspace.root.glob("pdiff_adapters/*/*/manifest.json")}
    assert len(manifests) == 2 * len(CATEGORIES)  # the scored draw and the z1 draw of each category
    assert {m["meta"]["batch_categories"] for m in manifests.values()} == {len(CATEGORIES)}
    lost = CATEGORIES[0]
    kept = {f: (f / "manifest.json").stat().st_mtime_ns for f in manifests if f.parent.name != lost}
    lost_bytes = {p: sha256(p) for p in (workspace.root / "pdiff_adapters" / lost).rglob("*.safetensors")}
    assert len(lost_bytes) == 2
    shutil.rmtree(workspace.root / "pdiff_adapters" / lost)

    second = workspace.run()
    assert second.is_completed(), second.message
    states = states_by_name(second)
    rerun = {"sample-pdiff", "sample-pdiff-z1"}
    assert {name: s for name, s in states.items() if s != "Cached"} == dict.fromkeys(rerun, "Completed")
    assert {p: sha256(p) for p in lost_bytes} == lost_bytes
    assert {f: (f / "manifest.json").stat().st_mtime_ns for f in kept} == kept  # the others were not rewritten
    assert second.result()["rows"] == first.result()["rows"]
