"""COCO files and mAP: the face tasks' JSON loads in pycocotools, ground truth scores 1.0 against itself, and
COCOeval agrees with hand-computed AP."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO

from icm_core.vision.coco import CocoError, coco_from_dict, detections_to_coco, evaluate_coco, load_coco


def test_face_task_json_loads_in_pycocotools(face_task_dir: Path):
    for split, n in (("train", 4), ("test", 3)):
        coco = COCO(str(face_task_dir / f"{split}.json"))  # pycocotools' own loader
        assert len(coco.getImgIds()) == n
        assert coco.getCatIds() == [1]
        for ann in coco.loadAnns(coco.getAnnIds()):
            x, y, w, h = ann["bbox"]
            assert w == h and 36 <= w <= 60 and ann["area"] == w * h  # pasted squares, exact
            image = coco.loadImgs(ann["image_id"])[0]
            assert 0 <= x and x + w <= image["width"] and 0 <= y and y + h <= image["height"]
            assert (face_task_dir / image["file_name"]).is_file()


def test_ground_truth_against_itself_is_perfect(face_task_dir: Path):
    gt = load_coco(face_task_dir / "test.json")
    results = [
        {"image_id": a["image_id"], "category_id": 1, "bbox": a["bbox"], "score": 1.0}
        for a in gt.dataset["annotations"]
    ]
    score = evaluate_coco(gt, results)
    assert score["map50"] == score["map75"] == score["map"] == 1.0


def _two_faces() -> dict:
    return {
        "images": [{"id": 1, "file_name": "a.png", "height": 100, "width": 200}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "area": 1600, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [120, 20, 50, 50], "area": 2500, "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "face"}],
    }


def test_hand_computed_average_precision():
    # Detections by score: TP (face 1), FP (empty area), TP (face 2). Precision/recall after each: (1, 0.5),
    # (0.5, 0.5), (2/3, 1). COCO's 101-point interpolated AP: recall 0..0.50 (51 points) at precision 1,
    # recall 0.51..1 (50 points) at 2/3 -> (51 + 50 * 2/3) / 101.
    gt = coco_from_dict(_two_faces())
    boxes = np.array([[10, 10, 50, 50], [60, 60, 90, 90], [120, 20, 170, 70]], dtype=float)
    results = detections_to_coco([1], [(boxes, np.array([0.9, 0.8, 0.7]))])
    score = evaluate_coco(gt, results)
    expected = (51 + 50 * 2 / 3) / 101
    assert score["map50"] == pytest.approx(expected, abs=1e-9)
    assert score["map75"] == pytest.approx(expected, abs=1e-9)


def test_iou_threshold_decides_map75():
    # One detection of the first face, a 40x40 box shifted by 4 px each way: overlap 36x36, IoU = 1296/1904 =
    # 0.681. It counts at IoU thresholds 0.50, 0.55, 0.60, 0.65, not at 0.70 or above -> mAP50 1, mAP75 0,
    # mAP50:95 = 4 of the 10 thresholds.
    gt = coco_from_dict({**_two_faces(), "annotations": _two_faces()["annotations"][:1]})
    box = np.array([[14.0, 14.0, 54.0, 54.0]])
    score = evaluate_coco(gt, detections_to_coco([1], [(box, np.array([0.9]))]))
    assert score["map50"] == pytest.approx(1.0) and score["map75"] == 0.0
    assert score["map"] == pytest.approx(0.4)


def test_no_detections_scores_zero():
    assert evaluate_coco(coco_from_dict(_two_faces()), [])["map50"] == 0.0


def test_bad_files_name_file_and_entry(tmp_path: Path):
    bad = _two_faces()
    bad["annotations"][1]["bbox"] = [1, 2, -3, 4]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(CocoError, match=r"bad\.json: annotations\[1\] bbox"):
        load_coco(path)
    del bad["images"]
    path.write_text(json.dumps(bad))
    with pytest.raises(CocoError, match="missing list 'images'"):
        load_coco(path)
    path.write_text("{not json")
    with pytest.raises(CocoError, match="not readable JSON"):
        load_coco(path)
