"""The real pretrained MTCNN: loading, a hand-checked detection and its mAP, and COCOeval on a face task
against an independent AP computation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from icm_core.vision.coco import coco_from_dict, detections_to_coco, evaluate_coco
from icm_core.vision.config import DetectorConfig
from icm_core.vision.faces import skimage_data_folder
from icm_core.vision.mtcnn import ModelLoadError, load_mtcnn, onet_crops, onet_hidden
from icm_core.vision.nms import box_iou
from icm_core.vision.stages import evaluate_detector, gt_boxes_xyxy, load_split, run_detector


def test_astronaut_face_hand_checked(mtcnn):
    # The astronaut photo has one face; facenet-pytorch's MTCNN puts it at about [181, 62, 268, 172].
    # Hand-labelled ground truth box [175, 55, 275, 180] (xyxy) contains that detection: IoU = its area / ours
    # = 86.7 * 109.9 / (100 * 125) = 0.762. So it is a true positive at IoU 0.50 ... 0.75 (6 of the 10
    # COCO thresholds) and mAP50 = mAP75 = 1, mAP50:95 = 0.6.
    with Image.open(skimage_data_folder() / "astronaut.png") as handle:
        image = np.asarray(handle.convert("RGB"))
    [(boxes, scores)] = run_detector(mtcnn, [image], DetectorConfig(thresholds=(0.6, 0.7, 0.7)), {})[0]
    assert boxes.shape == (1, 4) and scores[0] > 0.999
    assert np.allclose(boxes[0], [181.05, 62.16, 267.75, 172.05], atol=0.5)
    gt = coco_from_dict(
        {
            "images": [{"id": 1, "file_name": "astronaut.png", "height": 512, "width": 512}],
            "annotations": [
                {"id": 1, "image_id": 1, "category_id": 1, "bbox": [175, 55, 100, 125], "area": 12500, "iscrowd": 0}
            ],
            "categories": [{"id": 1, "name": "face"}],
        }
    )
    iou = float(box_iou(torch.tensor(boxes), torch.tensor([[175.0, 55, 275, 180]]))[0, 0])
    assert iou == pytest.approx(0.762, abs=0.005)
    score = evaluate_coco(gt, detections_to_coco([1], [(boxes, scores)]))
    assert score["map50"] == pytest.approx(1.0) and score["map75"] == pytest.approx(1.0)
    assert score["map"] == pytest.approx(0.6)


def reference_ap(gt: list[np.ndarray], dets: list[tuple[np.ndarray, np.ndarray]], threshold: float) -> float:
    """Independent AP: greedy matching by score, 101-point interpolated precision (COCO's definition)."""
    rows = [(s, i, b) for i, (boxes, scores) in enumerate(dets) for b, s in zip(boxes, scores, strict=True)]
    rows.sort(key=lambda r: -r[0])
    used = [np.zeros(len(g), bool) for g in gt]
    total = sum(len(g) for g in gt)
    tp = []
    for _, i, box in rows:
        if len(gt[i]) == 0:
            tp.append(0)
            continue
        ious = box_iou(torch.tensor(box[None]), torch.tensor(gt[i])).numpy()[0]
        ious[used[i]] = -1
        j = int(ious.argmax())
        if ious[j] >= threshold:
            used[i][j] = True
            tp.append(1)
        else:
            tp.append(0)
    tp = np.array(tp)
    recall = np.cumsum(tp) / total
    precision = np.cumsum(tp) / np.arange(1, len(tp) + 1)
    ap = 0.0
    for r in np.linspace(0, 1, 101):
        mask = recall >= r - 1e-12
        ap += precision[mask].max() if mask.any() else 0.0
    return ap / 101


def test_base_detector_map_matches_reference(face_task_dir: Path, mtcnn):
    det_cfg = DetectorConfig()
    coco, records, images = load_split(face_task_dir, "test")
    detections, _ = run_detector(mtcnn, images, det_cfg, {})
    gt = gt_boxes_xyxy(coco, records)
    score = evaluate_detector(face_task_dir, None, det_cfg)
    assert score["images"] == 3 and score["boxes"] == sum(len(g) for g in gt)
    assert score["map50"] == pytest.approx(reference_ap(gt, detections, 0.5), abs=1e-6)
    assert score["map75"] == pytest.approx(reference_ap(gt, detections, 0.75), abs=1e-6)


def test_onet_hidden_layer(mtcnn):
    image = np.full((60, 60, 3), 128, np.uint8)
    crops = onet_crops(image, np.array([[5.0, 5, 45, 45], [0, 0, 59, 59]]))
    assert crops.shape == (2, 3, 48, 48)
    assert onet_hidden(mtcnn, crops).shape == (2, 256)


def test_missing_weights_named(tmp_path: Path):
    with pytest.raises(ModelLoadError, match="pnet.pt"):
        load_mtcnn(tmp_path)
