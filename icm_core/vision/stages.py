"""The detection pipeline's stages as functions over artifact folders (no Prefect here).

    prepare_detection_task -> finetune_detector -> detector_task_vector   (per task)
    icm_core.generator.stages / soup_adapter / train_pdiff_stage  (all tasks; unchanged)
    icm_core.generator.stages (per task) / sample_pdiff_states (all tasks, one batch)  (unchanged)
    evaluate_detector                                                      (per task and method)

A task folder holds ``task.json`` (name, description, where the images are), ``train.json`` and
``test.json`` (COCO), and for the built-in face tasks ``images/``. Trajectories use the language
pipeline's format, so the generator and baseline stages read them as they are.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from icm_core.infra.io import atomic_path, read_json, save_tensors, write_json
from icm_core.lora.adapters import load_adapter, merge_adapter
from icm_core.lora.trajectory import read_trajectory
from icm_core.vision.coco import coco_from_dict, detections_to_coco, evaluate_coco, load_coco
from icm_core.vision.config import (
    DetectionDataConfig,
    DetectionLoraConfig,
    DetectionTaskVectorConfig,
    DetectorConfig,
    task_slug,
)


TASK_INFO = "task.json"


# ---------------------------------------------------------------------------------------------- data


def prepare_detection_task(task: str, data_cfg: DetectionDataConfig, out: str | Path) -> dict[str, Any]:
    """Write one task's images (built-in faces) and COCO train/test annotation files under ``out``."""
    out = Path(out)
    if data_cfg.source == "faces":
        return _prepare_face_task(task, data_cfg, out)
    from icm_core.vision.coco_tasks import split_coco_task

    return split_coco_task(task, data_cfg, out)


def _prepare_face_task(task: str, data_cfg: DetectionDataConfig, out: Path) -> dict[str, Any]:
    from PIL import Image

    from icm_core.vision.faces import CONDITIONS, FaceSceneSpec, coco_dataset, render_split

    condition = CONDITIONS[task]
    spec = FaceSceneSpec(data_cfg.image_size, data_cfg.min_face, data_cfg.max_face, data_cfg.max_faces)
    counts = {}
    for split, n in (("train", data_cfg.train_images), ("test", data_cfg.test_images)):
        images, faces = render_split(condition, split, n, spec, data_cfg.seed)
        names = [f"images/{split}-{i:04d}.png" for i in range(len(images))]
        (out / "images").mkdir(parents=True, exist_ok=True)
        for name, image in zip(names, images, strict=True):
            with atomic_path(out / name) as tmp:
                Image.fromarray(image).save(tmp, format="PNG")
        info = {"description": f"face detection: {condition.description}", "task": task, "split": split}
        write_json(out / f"{split}.json", coco_dataset(names, [im.shape[:2] for im in images], faces, info))
        counts[split] = {"images": len(images), "boxes": sum(len(f) for f in faces)}
    write_json(
        out / TASK_INFO,
        {
            "name": task,
            "description": condition.description,
            "images_root": ".",
            "category_ids": [1],
            "source": "faces",
        },
    )
    return {"task": task, "folder": str(out), **counts}


def read_task(task_dir: str | Path) -> dict[str, Any]:
    """``task.json`` with ``images_root`` resolved against the task folder."""
    task_dir = Path(task_dir)
    info = read_json(task_dir / TASK_INFO)
    info["images_root"] = str((task_dir / info["images_root"]).resolve())
    info["category_names"] = {int(k): v for k, v in info.get("category_names", {}).items()}
    return info


def load_split(task_dir: str | Path, split: str) -> tuple[Any, list[dict[str, Any]], list[np.ndarray]]:
    """(pycocotools COCO, image records sorted by id, RGB uint8 images) of a task split."""
    from PIL import Image

    info = read_task(task_dir)
    coco = load_coco(Path(task_dir) / f"{split}.json")
    records = sorted(coco.dataset["images"], key=lambda r: r["id"])
    images = []
    for record in records:
        path = Path(info["images_root"]) / record["file_name"]
        if not path.is_file():
            raise FileNotFoundError(
                f"{Path(task_dir) / (split + '.json')}: image {record['file_name']!r} not found "
                f"under {info['images_root']}"
            )
        with Image.open(path) as handle:
            images.append(np.asarray(handle.convert("RGB")))
    return coco, records, images


def gt_boxes_xyxy(coco, records: list[dict[str, Any]], category_ids: list[int] | None = None) -> list[np.ndarray]:
    """Ground-truth boxes per image as xyxy arrays (optionally only some categories)."""
    out = []
    for record in records:
        anns = coco.imgToAnns.get(record["id"], [])
        boxes = [
            [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
            for a in anns
            if category_ids is None or a["category_id"] in category_ids
        ]
        out.append(np.asarray(boxes, dtype=np.float64).reshape(-1, 4))
    return out


# ------------------------------------------------------------------------------------------ detector


def detector_identity(det_cfg: DetectorConfig) -> str:
    """The id adapters record as their base model."""
    return f"{det_cfg.kind}:{det_cfg.name_or_path}"


def load_detector(det_cfg: DetectorConfig, task_info: dict[str, Any] | None = None) -> torch.nn.Module:
    """A fresh base detector (peft wraps models in place: load one per adapter)."""
    if det_cfg.kind == "mtcnn":
        from icm_core.vision.mtcnn import load_mtcnn

        return load_mtcnn(None if det_cfg.name_or_path == "facenet-pytorch" else det_cfg.name_or_path)
    if det_cfg.kind == "florence2":
        from icm_core.vision.florence import load_florence

        return load_florence(det_cfg)
    from icm_core.vision.hf_detector import load_hf_detector

    return load_hf_detector(det_cfg)


def _device(det_cfg: DetectorConfig) -> torch.device:
    from icm_core.models.base_model import resolve_device

    return resolve_device(det_cfg.device)


def run_detector(
    model: torch.nn.Module, images: list[np.ndarray], det_cfg: DetectorConfig, task_info: dict[str, Any]
) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[np.ndarray] | None]:
    """Detections per image (boxes xyxy, scores) and, for multi-class detectors, COCO category ids."""
    if det_cfg.kind == "mtcnn":
        from icm_core.vision.mtcnn import CascadeConfig, detect

        return detect(model, images, CascadeConfig(det_cfg.min_face_size, tuple(det_cfg.thresholds))), None
    if det_cfg.kind == "florence2":
        from icm_core.vision.florence import florence_detect

        return florence_detect(model, images, det_cfg, task_info)
    from icm_core.vision.hf_detector import hf_detect

    return hf_detect(model, images, det_cfg, task_info)


def finetune_detector(
    task_dir: str | Path,
    det_cfg: DetectorConfig,
    lora_cfg: DetectionLoraConfig,
    out: str | Path,
    on_step=None,
    resume=None,
) -> dict[str, Any]:
    """Fine-tune LoRA on the detector with a task's train split; save its trajectory and final adapter
    (``resume``: an ``icm_core.infra.resume`` to save state to and continue from)."""
    from icm_core.vision.detector_lora import train_detector_lora

    info = read_task(task_dir)
    coco, records, images = load_split(task_dir, "train")
    gt = gt_boxes_xyxy(coco, records, info["category_ids"])
    model = load_detector(det_cfg, info).to(_device(det_cfg))
    if det_cfg.kind == "mtcnn":
        from icm_core.vision.detector_lora import mtcnn_crop_set, mtcnn_loss_fn

        samples = mtcnn_crop_set(images, gt, lora_cfg)
        count, loss_fn = len(samples), mtcnn_loss_fn(samples, lora_cfg.box_weight)
    elif det_cfg.kind == "florence2":
        from icm_core.vision.florence import florence_loss_fn

        count, loss_fn = len(images), florence_loss_fn(images, gt, det_cfg, info)
    else:
        from icm_core.vision.hf_detector import hf_loss_fn

        count, loss_fn = len(images), hf_loss_fn(images, gt, det_cfg, info)
    started = time.perf_counter()
    trajectory = train_detector_lora(model, count, loss_fn, lora_cfg, out, detector_identity(det_cfg), on_step, resume)
    return {**trajectory.summary(), "train_samples": count, "seconds": time.perf_counter() - started}


def detector_task_vector(
    task_dir: str | Path,
    trajectory_dir: str | Path | None,
    det_cfg: DetectorConfig,
    tv_cfg: DetectionTaskVectorConfig,
    out_path: str | Path,
) -> dict[str, Any]:
    """A task's condition: the detector's last hidden layer averaged over training samples, or a CLIP embedding."""
    info = read_task(task_dir)
    coco, records, images = load_split(task_dir, "train")
    rng = np.random.default_rng(tv_cfg.seed)
    if tv_cfg.source == "clip_text":
        from icm_core.vision.clip import ClipEncoder

        vector = ClipEncoder(tv_cfg.clip_model, tv_cfg.clip_checkpoint).text_vector(info["description"])
    elif tv_cfg.source == "clip_image":
        from icm_core.vision.clip import ClipEncoder

        picks = rng.permutation(len(images))[: tv_cfg.num_samples]
        vector = ClipEncoder(tv_cfg.clip_model, tv_cfg.clip_checkpoint).image_vector([images[i] for i in picks])
    else:
        model = load_detector(det_cfg, info).to(_device(det_cfg))
        if tv_cfg.hidden_from == "finetuned":
            if trajectory_dir is None:
                raise ValueError("task_vector.hidden_from='finetuned' needs the task's trajectory")
            model = load_adapter(model, read_trajectory(trajectory_dir).adapter_dir, detector_identity(det_cfg))
        model.eval()
        gt = gt_boxes_xyxy(coco, records, info["category_ids"])
        vector = _hidden_vector(model, images, gt, det_cfg, tv_cfg, rng, info)
    digest = save_tensors(
        out_path,
        {"task_vector": vector.float().cpu()},
        {"category": info["name"], "config": tv_cfg.model_dump(mode="json")},
    )
    return {"path": str(out_path), "sha256": digest, "dim": int(vector.shape[0])}


def _hidden_vector(model, images, gt, det_cfg, tv_cfg, rng, info) -> torch.Tensor:
    if det_cfg.kind == "mtcnn":
        from icm_core.vision.mtcnn import onet_crops, onet_hidden

        # Samples = the task's ground-truth faces, cut as square O-Net inputs (what the last stage sees).
        crops = []
        for image, boxes in zip(images, gt, strict=True):
            if len(boxes):
                side = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
                cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
                square = np.stack([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], axis=1)
                crops.append(onet_crops(image, square))
        if not crops:
            raise ValueError(f"task {info['name']!r}: no ground-truth boxes in the train split")
        crops = torch.cat(crops)
        picks = torch.as_tensor(rng.permutation(len(crops))[: tv_cfg.num_samples])
        return onet_hidden(model, crops[picks]).mean(0)
    if det_cfg.kind == "florence2":
        from icm_core.vision.florence import florence_hidden

        # Samples = training images with their answers; the paper's last-step decoder state, averaged.
        picks = rng.permutation(len(images))[: tv_cfg.num_samples]
        return florence_hidden(model, [images[i] for i in picks], [gt[i] for i in picks], det_cfg, info).mean(0)
    from icm_core.vision.hf_detector import hf_hidden

    picks = rng.permutation(len(images))[: tv_cfg.num_samples]
    return hf_hidden(model, [images[i] for i in picks], det_cfg).mean(0)


def evaluate_detector(
    task_dir: str | Path,
    adapter_dir: str | Path | None,
    det_cfg: DetectorConfig,
    out_path: str | Path | None = None,
) -> dict[str, Any]:
    """mAP50 / mAP75 (COCOeval) on a task's test split of the base detector merged with ``adapter_dir``."""
    info = read_task(task_dir)
    coco, records, images = load_split(task_dir, "test")
    model = load_detector(det_cfg, info).to(_device(det_cfg))
    if adapter_dir is not None:
        model = merge_adapter(model, adapter_dir, detector_identity(det_cfg))
    model.eval()
    started = time.perf_counter()
    detections, labels = run_detector(model, images, det_cfg, info)
    seconds = time.perf_counter() - started
    results = detections_to_coco([r["id"] for r in records], detections, info["category_ids"][0], labels)
    score = evaluate_coco(coco, results, info["category_ids"])
    result = {
        "adapter_dir": str(adapter_dir) if adapter_dir else None,
        "images": len(images),
        "boxes": len(coco.dataset["annotations"]),
        "seconds": seconds,
        **score,
    }
    if out_path is not None:
        write_json(out_path, result)
        write_json(Path(out_path).with_name("detections.json"), results)
    return result


__all__ = [
    "coco_from_dict",
    "detector_identity",
    "detector_task_vector",
    "evaluate_detector",
    "finetune_detector",
    "load_detector",
    "load_split",
    "prepare_detection_task",
    "read_task",
    "run_detector",
    "task_slug",
]


def source_fingerprint(data_cfg: DetectionDataConfig) -> str:
    """sha256 of the files a task is built from (built-in face sources, or the COCO annotation file)."""
    import hashlib

    from icm_core.infra.io import sha256_file

    if data_cfg.source == "coco":
        return sha256_file(data_cfg.coco_annotations)
    from icm_core.vision.faces import BACKGROUNDS, skimage_data_folder

    folder = skimage_data_folder()
    digest = hashlib.sha256()
    for name in ("lfw_subset.npy", *BACKGROUNDS):
        digest.update(sha256_file(folder / name).encode())
    return digest.hexdigest()
