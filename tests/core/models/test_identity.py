"""Tests of icm_core.models.identity: a model's identity by content, for cache keys."""

from __future__ import annotations

import shutil

import pytest

from icm_core.infra.io import HASHED
from icm_core.models import identity as model_identity
from icm_core.models.config import ModelConfig
from tasks.artifacts import stage_key


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
