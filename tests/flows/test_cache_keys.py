"""Cache keys that cannot go stale (issue 14): the model's content and the numeric libraries' versions are in
every key that depends on them, stale records are expired through Prefect's own API, outputs are checked by
stat unless a full verification is asked for, and no output is silently replaced."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from icm_core.generator.config import TaskVectorConfig
from icm_core.infra.io import HASHED, ArtifactError
from icm_core.models import identity as model_identity
from icm_core.models.config import ModelConfig
from tasks.artifacts import stage_key
from tasks.manifest import VERIFY_ENV, valid_output, verify_manifest, write_manifest
from tests import helpers
from tests.flows.support import CATEGORIES, expected_task_runs, states_by_name


REPO = Path(__file__).resolve().parents[2]


def test_replaced_model_weights_recompute_every_stage_that_reads_the_model(workspace, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(Path(workspace.config.model.name_or_path), model_dir)
    config = workspace.config.model_copy(
        update={"model": workspace.config.model.model_copy(update={"name_or_path": str(model_dir)})}
    )
    first = workspace.run(config=config)
    assert first.is_completed(), first.message

    # Same folder, same file names and sizes: only the weights differ (another seed).
    helpers.save_tiny_base(tmp_path / "other", seed=1)
    weights = next(p.name for p in model_dir.iterdir() if p.suffix == ".safetensors")
    assert (tmp_path / "other" / weights).stat().st_size == (model_dir / weights).stat().st_size
    shutil.copyfile(tmp_path / "other" / weights, model_dir / weights)

    second = workspace.run(config=config)
    assert second.is_completed(), second.message
    states = states_by_name(second)
    assert set(states) == expected_task_runs()
    readers = {f"{stage}-{c}" for c in CATEGORIES for stage in ("lora", "task-vector")}
    readers |= {f"eval-{c}-{m}" for c in CATEGORIES for m in ("base", "lora", "model_soup", "cond_pdiff", "icm_lora")}
    assert {n: states[n] for n in readers} == dict.fromkeys(readers, "Completed")
    assert {n: states[n] for n in (f"data-{c}" for c in CATEGORIES)} == dict.fromkeys(
        (f"data-{c}" for c in CATEGORIES), "Cached"
    )
    assert second.result()["rows"] != first.result()["rows"]  # a stale hit would have repeated the old numbers

    third = workspace.run(config=config)
    assert set(states_by_name(third).values()) == {"Cached"}


def test_model_fingerprint_is_stat_checked_and_fully_verified_on_demand(tmp_path, tiny_base_dir):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_base_dir, model_dir)
    records = tmp_path / "records"
    first = model_identity.path_or_hub_identity(str(model_dir), records)
    before = HASHED["bytes"]
    assert model_identity.path_or_hub_identity(str(model_dir), records) == first
    assert HASHED["bytes"] == before  # unchanged files: stat only, nothing read

    # A byte changed in place with size and mtime restored: only a full verification sees it.
    weights = next(p for p in model_dir.iterdir() if p.suffix == ".safetensors")
    st = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    import os

    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert model_identity.path_or_hub_identity(str(model_dir), records) == first
    assert model_identity.path_or_hub_identity(str(model_dir), records, full=True) != first


def test_hub_id_is_keyed_by_its_cached_revision(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--org--model"
    (repo / "snapshots" / ("a" * 40)).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    assert model_identity.hub_revision("org/model") == "a" * 40
    cfg = lambda: ModelConfig(name_or_path="org/model")  # noqa: E731
    key_a = stage_key("lora", {"model_cfg": cfg(), "root": str(tmp_path / "root")})
    (repo / "snapshots" / ("b" * 40)).mkdir()
    (repo / "refs" / "main").write_text("b" * 40)  # the hub's main moved and the cache fetched it
    assert stage_key("lora", {"model_cfg": cfg(), "root": str(tmp_path / "root")}) != key_a

    from icm_core.models.identity import ModelLoadError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="'org/absent'.*cannot load.*hub revision"):
        model_identity.hub_revision("org/absent")


def test_library_versions_are_in_every_key(monkeypatch, tmp_path):
    inputs = {"cvae_cfg": {"epochs": 3}, "root": str(tmp_path)}
    key = stage_key("generator", inputs)
    real = model_identity.library_versions()
    assert set(real) == {"torch", "transformers", "peft"} and real["torch"].startswith(torch.__version__[:4])
    monkeypatch.setattr(model_identity, "library_versions", lambda: {**real, "transformers": "99.0.0"})
    assert stage_key("generator", inputs) != key
    monkeypatch.setattr(model_identity, "library_versions", lambda: {**real, "torch": "9.9.9"})
    assert stage_key("generator", inputs) != key
    monkeypatch.setattr(model_identity, "library_versions", lambda: real)
    assert stage_key("generator", inputs) == key


def test_description_encoder_identity_is_in_the_task_vector_key(tmp_path):
    encoder = tmp_path / "encoder"
    encoder.mkdir()
    (encoder / "model.safetensors").write_bytes(b"one")
    cfg = TaskVectorConfig(source="description", text_encoder=str(encoder))
    key = stage_key("task_vectors", {"tv_cfg": cfg, "root": str(tmp_path / "root")})
    (encoder / "model.safetensors").write_bytes(b"two")
    assert stage_key("task_vectors", {"tv_cfg": cfg, "root": str(tmp_path / "root")}) != key


def test_manifest_checks_are_stat_only_unless_full(tmp_path, monkeypatch):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"x" * 100_000)
    write_manifest(folder, {})
    before = HASHED["bytes"]
    for _ in range(3):
        assert valid_output(folder) is not None
    assert HASHED["bytes"] == before  # O(files) stats, O(0) bytes

    path = folder / "weights.bin"
    st = path.stat()
    path.write_bytes(b"y" * 100_000)
    import os

    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime: a quick check cannot tell
    assert valid_output(folder) is not None
    monkeypatch.setenv(VERIFY_ENV, "full")
    assert valid_output(folder) is None
    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        verify_manifest(folder)
    monkeypatch.delenv(VERIFY_ENV)
    path.write_bytes(b"z" * 100_000)  # a normal write changes the mtime: caught without a full check
    assert valid_output(folder) is None


def test_two_description_generations_keep_both_adapters(workspace, tmp_path):
    from flows.generate import generate_adapter

    config = workspace.config.model_copy(
        update={"task_vector": TaskVectorConfig(source="description"), "methods": ("base", "lora", "icm_lora")}
    )
    assert workspace.run(config=config).is_completed()
    first = generate_adapter(description="slow-cooked winter stews", root=str(workspace.root))
    second = generate_adapter(description="gale warnings for the north sea", root=str(workspace.root))
    a, b = Path(first["adapter_dir"]), Path(second["adapter_dir"])
    assert a != b and a.is_dir() and b.is_dir()
    assert first["adapter_sha256"] != second["adapter_sha256"]
    from icm_core.lora.adapters import adapter_sha256

    assert adapter_sha256(a) == first["adapter_sha256"]  # the first was not overwritten by the second

    # An explicit folder that exists is refused without overwrite=True, and left as it was.
    with pytest.raises(FileExistsError, match="overwrite"):
        generate_adapter(description="anything else", out=str(a), root=str(workspace.root))
    assert adapter_sha256(a) == first["adapter_sha256"]
    replaced = generate_adapter(description="anything else", out=str(a), root=str(workspace.root), overwrite=True)
    assert adapter_sha256(a) == replaced["adapter_sha256"] != first["adapter_sha256"]


def test_drop_cache_record_expires_it_through_the_result_store(prefect_api, tmp_path):
    """The policy's drop goes through ResultStore (any storage block): the record reads as absent afterwards."""
    from prefect.filesystems import LocalFileSystem
    from prefect.results import ResultStore
    from prefect.serializers import JSONSerializer

    from tasks.artifacts import drop_cache_record

    store = ResultStore(result_storage=LocalFileSystem(basepath=str(tmp_path)), serializer=JSONSerializer())
    store.write(obj={"ref": 1}, key="k" * 64)
    assert store.exists("k" * 64)

    class Ctx:
        result_store = store

    assert drop_cache_record(Ctx(), "k" * 64)
    assert not store.exists("k" * 64)
    assert not drop_cache_record(Ctx(), "k" * 64)  # nothing left to drop
    assert json.loads((tmp_path / ("k" * 64)).read_text())["metadata"]["expiration"]  # expired, not deleted
