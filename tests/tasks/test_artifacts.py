"""Tests of tasks.artifacts: what a stage's cache key is made of besides its inputs."""

from __future__ import annotations

import torch

from icm_core.generator.config import TaskVectorConfig
from icm_core.models import identity as model_identity
from tasks.artifacts import stage_key


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
