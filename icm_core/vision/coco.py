"""COCO-format ground truth and detections, evaluated with pycocotools' COCOeval (mAP50, mAP75, mAP50:95).

A task folder holds ``images/`` and one annotation file per split (``train.json``, ``test.json``). Files
are validated on read (pycocotools must load them, boxes must be finite and positive), and errors name the
file and the offending entry.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


class CocoError(ValueError):
    """A COCO annotation or detection file is malformed; the message names the file and the entry."""


def check_coco(data: dict[str, Any], where: str | Path) -> None:
    """Raise CocoError unless ``data`` is a COCO detection dataset pycocotools can evaluate."""
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise CocoError(f"{where}: missing list {key!r}")
    image_ids = set()
    for i, image in enumerate(data["images"]):
        for field in ("id", "file_name", "height", "width"):
            if field not in image:
                raise CocoError(f"{where}: images[{i}] has no {field!r}")
        image_ids.add(image["id"])
    category_ids = {c.get("id") for c in data["categories"]}
    for i, ann in enumerate(data["annotations"]):
        bbox = ann.get("bbox")
        if not isinstance(bbox, list | tuple) or len(bbox) != 4 or not all(math.isfinite(float(v)) for v in bbox):
            raise CocoError(f"{where}: annotations[{i}] bbox {bbox!r} is not 4 finite numbers [x, y, w, h]")
        if bbox[2] <= 0 or bbox[3] <= 0:
            raise CocoError(f"{where}: annotations[{i}] bbox {bbox} has a non-positive width or height")
        if ann.get("image_id") not in image_ids:
            raise CocoError(f"{where}: annotations[{i}] names unknown image_id {ann.get('image_id')!r}")
        if ann.get("category_id") not in category_ids:
            raise CocoError(f"{where}: annotations[{i}] names unknown category_id {ann.get('category_id')!r}")


def load_coco(path: str | Path):
    """A pycocotools ``COCO`` object for an annotation file, validated first."""

    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CocoError(f"{path}: not readable JSON ({exc})") from exc
    check_coco(data, path)
    return coco_from_dict(data)


def coco_from_dict(data: dict[str, Any]):
    """A pycocotools ``COCO`` built from an in-memory dict (pycocotools' own indexing, quietly)."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def detections_to_coco(
    image_ids: Sequence[int],
    detections: Sequence[tuple[np.ndarray, np.ndarray]],
    category_id: int = 1,
    labels: Sequence[np.ndarray] | None = None,
) -> list[dict[str, Any]]:
    """Per-image (boxes xyxy [K,4], scores [K]) -> COCO result rows (bbox as [x, y, w, h])."""
    rows = []
    for n, (image_id, (boxes, scores)) in enumerate(zip(image_ids, detections, strict=True)):
        for k, (box, score) in enumerate(
            zip(np.asarray(boxes).reshape(-1, 4), np.asarray(scores).reshape(-1), strict=True)
        ):
            x1, y1, x2, y2 = (float(v) for v in box)
            rows.append(
                {
                    "image_id": int(image_id),
                    "category_id": int(labels[n][k]) if labels is not None else category_id,
                    "bbox": [x1, y1, max(x2 - x1, 0.0), max(y2 - y1, 0.0)],
                    "score": float(score),
                }
            )
    return rows


def evaluate_coco(gt, results: list[dict[str, Any]], category_ids: Sequence[int] | None = None) -> dict[str, float]:
    """COCOeval (bbox) of result rows against a ``COCO`` ground truth: mAP50:95, mAP50, mAP75, recall@100.

    No detections at all scores 0 (pycocotools refuses an empty result list)."""
    from pycocotools.cocoeval import COCOeval

    if not results:
        return {"map": 0.0, "map50": 0.0, "map75": 0.0, "recall100": 0.0, "detections": 0}
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes([dict(r) for r in results])
        evaluator = COCOeval(gt, dt, "bbox")
        if category_ids is not None:
            evaluator.params.catIds = list(category_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = [max(float(v), 0.0) for v in evaluator.stats]  # -1 means "no ground truth in this area range"
    return {"map": stats[0], "map50": stats[1], "map75": stats[2], "recall100": stats[8], "detections": len(results)}
