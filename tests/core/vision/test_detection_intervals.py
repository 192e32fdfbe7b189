"""Bootstrap intervals for detection: AP50 from per-image matches equals COCOeval's mAP50, and the paired
intervals over images see a real difference and no difference where there is none."""

from __future__ import annotations

import numpy as np
import pytest

from icm_core.report.detection import ap50, detection_intervals, image_matches
from icm_core.vision.coco import coco_from_dict, evaluate_coco


def scene(seed: int, images: int = 30):
    """Ground truth with 1-3 boxes per image (some crowd), and detections of two quality levels."""
    rng = np.random.default_rng(seed)
    gt = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "face"}, {"id": 2, "name": "cat"}]}
    good, poor = [], []
    ann_id = 1
    for image in range(1, images + 1):
        gt["images"].append({"id": image, "file_name": f"{image}.png", "width": 200, "height": 200})
        for _ in range(rng.integers(1, 4)):
            x, y, w, h = (float(v) for v in rng.uniform([0, 0, 20, 20], [140, 140, 60, 60]))
            cat = int(rng.integers(1, 3))
            crowd = int(rng.random() < 0.08)
            gt["annotations"].append(
                {
                    "id": ann_id,
                    "image_id": image,
                    "category_id": cat,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": crowd,
                }
            )
            ann_id += 1
            for dets, jitter, miss in ((good, 3.0, 0.05), (poor, 12.0, 0.35)):
                if rng.random() < miss:
                    continue
                jx, jy = rng.normal(0, jitter, size=2)
                dets.append(
                    {
                        "image_id": image,
                        "category_id": cat,
                        "bbox": [x + jx, y + jy, w, h],
                        "score": float(rng.uniform(0.3, 1.0)),
                    }
                )
        for dets in (good, poor):  # a false positive now and then
            if rng.random() < 0.3:
                dets.append(
                    {
                        "image_id": image,
                        "category_id": int(rng.integers(1, 3)),
                        "bbox": [150.0, 150.0, 30.0, 30.0],
                        "score": float(rng.uniform(0.0, 0.9)),
                    }
                )
    return gt, good, poor


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ap50_from_matches_equals_cocoeval(seed):
    gt, good, poor = scene(seed)
    coco = coco_from_dict(gt)
    images = sorted(img["id"] for img in gt["images"])
    for dets in (good, poor):
        expected = evaluate_coco(coco, dets, [1, 2])["map50"]
        assert ap50(image_matches(gt, dets, [1, 2]), images, [1, 2]) == pytest.approx(expected, abs=1e-9)


def test_intervals_see_a_real_difference_and_none_where_there_is_none():
    gt, good, poor = scene(3, images=40)
    out = detection_intervals(gt, {"lora": good, "icm_lora": poor, "cond_pdiff": good}, [1, 2])
    worse = out["lora"]["icm_lora"]
    assert worse["diff"] < 0 and worse["ci95"][1] < 0 and worse["verdict"] == "worse"
    same = out["lora"]["cond_pdiff"]
    assert same["diff"] == 0.0 and same["ci95"] == [0.0, 0.0] and same["verdict"] == "no clear difference"
    assert "base" not in out  # no base detector given


def test_ap50_with_no_detections_is_zero():
    gt, good, _ = scene(4, images=6)
    images = sorted(img["id"] for img in gt["images"])
    assert ap50(image_matches(gt, [], [1, 2]), images, [1, 2]) == 0.0
    only_first = [d for d in good if d["image_id"] == images[0]]
    matches = image_matches(gt, only_first, [1, 2])
    assert ap50(matches, images[1:], [1, 2]) == 0.0  # a resample without the detected image
    out = detection_intervals(gt, {"lora": good, "base": []}, [1, 2])
    assert out["lora"]["base"]["diff"] < 0 and out["base"]["lora"]["verdict"] in ("better", "no clear difference")
