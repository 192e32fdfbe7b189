"""The large-model path on a tiny randomly initialised DETR (no pretrained backbone, nothing downloaded):
a COCO file split into per-label tasks, LoRA fine-tuning with the model's own loss, the decoder task vector,
and COCO evaluation of base and adapted models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from icm_core.lora.adapters import merge_adapter
from icm_core.lora.trajectory import read_trajectory
from icm_core.vision.coco import CocoError
from icm_core.vision.config import DetectionDataConfig, DetectionLoraConfig, DetectionTaskVectorConfig, DetectorConfig
from icm_core.vision.stages import (
    detector_task_vector,
    evaluate_detector,
    finetune_detector,
    load_detector,
    prepare_detection_task,
    read_task,
)


def tiny_detr(folder: Path) -> Path:
    import torch
    from transformers import AutoModelForObjectDetection, DetrConfig, ResNetConfig

    backbone = ResNetConfig(
        num_channels=3,
        embedding_size=8,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        layer_type="basic",
        out_features=["stage2"],
    )
    config = DetrConfig(
        backbone_config=backbone,
        use_timm_backbone=False,
        use_pretrained_backbone=False,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=16,
        decoder_ffn_dim=16,
        num_queries=6,
        num_labels=3,
        id2label={0: "background", 1: "square", 2: "disc"},
        label2id={"background": 0, "square": 1, "disc": 2},
    )
    torch.manual_seed(0)
    AutoModelForObjectDetection.from_config(config).save_pretrained(folder)
    return folder


def shapes_coco(folder: Path, n: int = 6) -> Path:
    """Images with a red square and/or a blue disc, and their COCO annotations."""
    rng = np.random.default_rng(0)
    images, annotations = [], []
    (folder / "img").mkdir(parents=True)
    for i in range(n):
        canvas = np.full((64, 80, 3), 200, np.uint8)
        x, y, s = int(rng.integers(2, 40)), int(rng.integers(2, 30)), int(rng.integers(12, 22))
        canvas[y : y + s, x : x + s] = (220, 30, 30)
        annotations.append(
            {
                "id": len(annotations) + 1,
                "image_id": i + 1,
                "category_id": 1,
                "bbox": [x, y, s, s],
                "area": s * s,
                "iscrowd": 0,
            }
        )
        if i % 2 == 0:
            yy, xx = np.mgrid[:64, :80]
            cx, cy, r = 60, 45, 8
            canvas[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = (30, 30, 220)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": 2,
                    "bbox": [cx - r, cy - r, 2 * r + 1, 2 * r + 1],
                    "area": (2 * r + 1) ** 2,
                    "iscrowd": 0,
                }
            )
        Image.fromarray(canvas).save(folder / "img" / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "height": 64, "width": 80})
    path = folder / "shapes.json"
    path.write_text(
        json.dumps(
            {
                "images": images,
                "annotations": annotations,
                "categories": [{"id": 1, "name": "square"}, {"id": 2, "name": "disc"}],
            }
        )
    )
    return path


def shapes_data_config(folder: Path) -> DetectionDataConfig:
    """The shapes COCO set written under ``folder`` and split into a 'square' and a 'disc' task."""
    annotations = shapes_coco(folder)
    return DetectionDataConfig(
        source="coco",
        tasks=("square", "disc"),
        coco_annotations=str(annotations),
        coco_images=str(folder / "img"),
        test_fraction=0.34,
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("hf")
    model_dir = tiny_detr(root / "detr")
    data_cfg = shapes_data_config(root / "coco")
    det_cfg = DetectorConfig(kind="transformers", name_or_path=str(model_dir), input_size=64, score_threshold=0.0)
    return root, data_cfg, det_cfg


def test_per_label_tasks(setup):
    root, data_cfg, _ = setup
    square = prepare_detection_task("square", data_cfg, root / "tasks" / "square")
    disc = prepare_detection_task("disc", data_cfg, root / "tasks" / "disc")
    assert square["train"]["images"] + square["test"]["images"] == 6
    assert disc["train"]["images"] + disc["test"]["images"] == 3  # only the images that contain a disc
    info = read_task(root / "tasks" / "disc")
    assert info["category_ids"] == [2] and info["category_names"] == {2: "disc"}
    test = json.loads((root / "tasks" / "disc" / "test.json").read_text())
    assert {a["category_id"] for a in test["annotations"]} == {2}
    with pytest.raises(CocoError, match="no category named 'cat'"):
        prepare_detection_task("cat", data_cfg.model_copy(update={"tasks": ("cat",)}), root / "tasks" / "cat")


def test_lora_task_vector_and_map(setup):
    root, data_cfg, det_cfg = setup
    task_dir = root / "tasks" / "sq2"
    prepare_detection_task("square", data_cfg, task_dir)
    lora_cfg = DetectionLoraConfig(
        target_modules=("class_labels_classifier", "bbox_predictor.layers.0", "q_proj", "v_proj"),
        steps=4,
        trajectory_size=2,
        warmup_steps=0,
        batch_size=2,
    )
    result = finetune_detector(task_dir, det_cfg, lora_cfg, root / "lora")
    assert len(result["checkpoints"]) == 2 and np.isfinite(result["final_loss"])
    adapter = read_trajectory(root / "lora").adapter_dir
    merged = merge_adapter(load_detector(det_cfg), adapter)
    assert not any("lora" in n for n, _ in merged.named_parameters())

    tv = detector_task_vector(
        task_dir, root / "lora", det_cfg, DetectionTaskVectorConfig(num_samples=2), root / "tv.safetensors"
    )
    assert tv["dim"] == 16  # d_model: the decoder's last hidden layer
    base = evaluate_detector(task_dir, None, det_cfg)
    tuned = evaluate_detector(task_dir, adapter, det_cfg)
    for score in (base, tuned):
        assert 0.0 <= score["map50"] <= 1.0 and 0.0 <= score["map75"] <= 1.0
        assert score["detections"] == score["images"] * 6  # every query scored for the task's label
