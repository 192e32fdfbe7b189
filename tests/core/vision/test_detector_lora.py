"""LoRA on the real MTCNN: training writes a trajectory the generator and baselines read, the adapter loads
and merges (merged = unmerged outputs), and the trained adapter changes what the detector outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from icm_core.baselines.soup import model_soup
from icm_core.generator.dataset import build_dataset
from icm_core.lora.adapters import load_adapter, merge_adapter, read_adapter
from icm_core.lora.trajectory import load_trajectory_checkpoints, read_trajectory
from icm_core.vision.config import DetectionLoraConfig, DetectionTaskVectorConfig, DetectorConfig
from icm_core.vision.mtcnn import load_mtcnn
from icm_core.vision.stages import detector_identity, detector_task_vector, finetune_detector


LORA = DetectionLoraConfig(
    steps=6,
    trajectory_size=3,
    warmup_steps=1,
    batch_size=32,
    lr=1e-2,
    positives_per_face=3,
    parts_per_face=1,
    negatives_per_image=4,
)


@pytest.fixture(scope="module")
def trajectory(face_task_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("det-lora")
    result = finetune_detector(face_task_dir, DetectorConfig(), LORA, out)
    assert result["train_samples"] > 0 and len(result["checkpoints"]) == 3
    return out


def test_trajectory_format(trajectory: Path):
    index = read_trajectory(trajectory)
    assert index.steps == [4, 5, 6]
    checkpoints = load_trajectory_checkpoints(trajectory)
    keys = set(checkpoints[0])
    assert {k.split(".lora_")[0].removeprefix("base_model.model.") for k in keys} == set(LORA.target_modules)
    assert index.adapter_config["base_model_name_or_path"] == detector_identity(DetectorConfig())
    # The language pipeline's generator and Model Soup take detector trajectories unchanged.
    dataset = build_dataset({"a": checkpoints, "b": checkpoints}, {"a": torch.zeros(4), "b": torch.ones(4)})
    assert dataset.weights.shape == (6, dataset.layout.total)
    state, config = model_soup([read_adapter(index.adapter_dir)] * 2)
    assert set(state) == keys and config["r"] >= 1


def test_adapter_loads_merges_and_changes_outputs(trajectory: Path):
    crops = torch.randn(5, 3, 48, 48) * 0.5
    base = load_mtcnn()
    with torch.no_grad():
        base_out = base(crops)
    wrapped = load_adapter(load_mtcnn(), read_trajectory(trajectory).adapter_dir, detector_identity(DetectorConfig()))
    merged = merge_adapter(load_mtcnn(), read_trajectory(trajectory).adapter_dir)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        lora_out, merged_out = wrapped(crops), merged(crops)
    for a, b in zip(lora_out, merged_out, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(lora_out[0], base_out[0], atol=1e-4)  # the box regression moved


def test_adapter_for_another_detector_is_refused(trajectory: Path):
    with pytest.raises(ValueError, match="made for base model"):
        load_adapter(load_mtcnn(), read_trajectory(trajectory).adapter_dir, "mtcnn:elsewhere")


def test_hidden_state_task_vector(face_task_dir: Path, trajectory: Path, tmp_path: Path):
    cfg = DetectionTaskVectorConfig(num_samples=4)
    tuned = detector_task_vector(face_task_dir, trajectory, DetectorConfig(), cfg, tmp_path / "tv.safetensors")
    base = detector_task_vector(
        face_task_dir,
        None,
        DetectorConfig(),
        cfg.model_copy(update={"hidden_from": "base"}),
        tmp_path / "tv0.safetensors",
    )
    assert tuned["dim"] == base["dim"] == 256 and tuned["sha256"] != base["sha256"]
    with pytest.raises(ValueError, match="needs the task's trajectory"):
        detector_task_vector(face_task_dir, None, DetectorConfig(), cfg, tmp_path / "x.safetensors")
