"""CLIP task vectors through open_clip, on a tiny randomly initialised model (no CLIP weights ship)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from icm_core.generator.task_vectors import load_task_vector
from icm_core.vision.clip import ClipEncoder, ClipError, register_model_config
from icm_core.vision.config import DetectionTaskVectorConfig, DetectorConfig
from icm_core.vision.stages import detector_task_vector


TINY = Path(__file__).with_name("tiny_clip.json")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """A tiny open_clip model (embed dim 32) with random weights, saved as a user checkpoint file."""
    name = register_model_config(TINY)
    torch.manual_seed(0)
    encoder = ClipEncoder(name, None, allow_random_init=True)
    path = tmp_path_factory.mktemp("clip") / "tiny_clip.pt"
    torch.save(encoder.model.state_dict(), path)
    return name, path


def test_vectors_have_the_embedding_size(tiny_checkpoint):
    name, path = tiny_checkpoint
    encoder = ClipEncoder(name, path)
    text = encoder.text_vector("faces in low light")
    images = [np.random.default_rng(i).integers(0, 255, (40, 50, 3), dtype=np.uint8) for i in range(3)]
    per_image = encoder.image_vectors(images)
    mean = encoder.image_vector(images)
    assert encoder.dim == 32 and text.shape == (32,) and per_image.shape == (3, 32) and mean.shape == (32,)
    assert torch.allclose(text.norm(), torch.tensor(1.0)) and torch.allclose(mean.norm(), torch.tensor(1.0))
    assert not torch.allclose(encoder.text_vector("faces in fog"), text)


def test_checkpoint_is_what_is_loaded(tiny_checkpoint):
    name, path = tiny_checkpoint
    a, b = ClipEncoder(name, path), ClipEncoder(name, path)
    assert torch.equal(a.text_vector("blur"), b.text_vector("blur"))
    torch.manual_seed(123)
    random = ClipEncoder(name, None, allow_random_init=True)
    assert not torch.allclose(random.text_vector("blur"), a.text_vector("blur"))


def test_errors_name_the_problem(tiny_checkpoint, tmp_path: Path):
    name, _ = tiny_checkpoint
    with pytest.raises(ClipError, match="clip_checkpoint"):
        ClipEncoder(name, None)
    with pytest.raises(ClipError, match="not found"):
        ClipEncoder(name, tmp_path / "missing.pt")
    with pytest.raises(ClipError, match="unknown open_clip model"):
        ClipEncoder("no-such-model", None, allow_random_init=True)
    junk = tmp_path / "junk.pt"
    torch.save({"not": torch.zeros(1)}, junk)
    with pytest.raises(ClipError, match="not a loadable"):
        ClipEncoder(name, junk)


@pytest.mark.parametrize("source", ["clip_text", "clip_image"])
def test_task_vector_stage(source, tiny_checkpoint, face_task_dir: Path, tmp_path: Path):
    name, path = tiny_checkpoint
    cfg = DetectionTaskVectorConfig(source=source, clip_model=name, clip_checkpoint=str(path), num_samples=3)
    out = tmp_path / "tv.safetensors"
    result = detector_task_vector(face_task_dir, None, DetectorConfig(), cfg, out)
    assert result["dim"] == 32 and load_task_vector(out).shape == (32,)
