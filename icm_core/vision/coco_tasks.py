"""Per-category detection tasks from a user COCO annotation file (the paper's split: one task per label).

A task named after a COCO category holds the images that contain that category, split train/test with a
seeded shuffle, and only that category's boxes. Images stay where they are (``task.json`` records the
folder); the annotation file's sha256 is part of the cache key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from icm_core.infra.io import write_json
from icm_core.vision.coco import CocoError, check_coco
from icm_core.vision.config import DetectionDataConfig, task_slug


def split_coco_task(task: str, data_cfg: DetectionDataConfig, out: Path) -> dict[str, Any]:
    """Write ``train.json`` / ``test.json`` / ``task.json`` for the COCO category named ``task``."""
    path = Path(data_cfg.coco_annotations)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CocoError(f"{path}: not readable JSON ({exc})") from exc
    check_coco(data, path)
    images_root = Path(data_cfg.coco_images).resolve()
    if not images_root.is_dir():
        raise FileNotFoundError(f"data.coco_images: {images_root} is not a folder")
    matches = [c for c in data["categories"] if c["name"] == task or task_slug(c["name"]) == task_slug(task)]
    if not matches:
        raise CocoError(
            f"{path}: no category named {task!r}; categories: {sorted(c['name'] for c in data['categories'])}"
        )
    category = matches[0]
    anns = [a for a in data["annotations"] if a["category_id"] == category["id"] and not a.get("iscrowd", 0)]
    image_ids = sorted({a["image_id"] for a in anns})
    if len(image_ids) < 2:
        raise CocoError(f"{path}: category {task!r} appears in {len(image_ids)} image(s); a task needs at least 2")
    order = np.random.default_rng(data_cfg.seed).permutation(len(image_ids))
    n_test = min(len(image_ids) - 1, max(1, int(round(len(image_ids) * data_cfg.test_fraction))))
    test_ids = {image_ids[i] for i in order[:n_test]}
    by_id = {im["id"]: im for im in data["images"]}
    counts = {}
    for split in ("train", "test"):
        ids = sorted(i for i in image_ids if (i in test_ids) == (split == "test"))
        subset = {
            "info": {"description": f"{task} ({split}) from {path.name}", "task": task, "split": split},
            "images": [by_id[i] for i in ids],
            "annotations": [a for a in anns if a["image_id"] in set(ids)],
            "categories": [category],
        }
        write_json(out / f"{split}.json", subset)
        counts[split] = {"images": len(ids), "boxes": len(subset["annotations"])}
    write_json(
        out / "task.json",
        {
            "name": task,
            "description": f"detect {category['name']}",
            "images_root": str(images_root),
            "category_ids": [category["id"]],
            "category_names": {str(category["id"]): category["name"]},
            "source": "coco",
        },
    )
    return {"task": task, "folder": str(out), **counts}
