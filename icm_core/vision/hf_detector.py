"""transformers object detectors (DETR, Conditional-DETR, Table-Transformer, ... any
``AutoModelForObjectDetection``) as LoRA-tunable detectors for GPU workers.

Images are resized to ``input_size`` squares and normalised with ImageNet statistics (what DETR-family
processors do, without needing the processor files); boxes travel normalised (cx, cy, w, h), so the resize
does not change them. The training loss is the model's own (Hungarian matching + class + L1 + GIoU); the
last hidden layer is the decoder output, averaged over queries.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from icm_core.vision.config import DetectorConfig


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DetectorLoadError(RuntimeError):
    """The transformers detector could not be loaded; the message names it."""


def load_hf_detector(det_cfg: DetectorConfig) -> torch.nn.Module:
    from transformers import AutoModelForObjectDetection

    try:
        model = AutoModelForObjectDetection.from_pretrained(
            det_cfg.name_or_path, trust_remote_code=det_cfg.trust_remote_code
        )
    except Exception as exc:
        raise DetectorLoadError(
            f"detector.name_or_path={det_cfg.name_or_path!r}: not a loadable object-detection model ({exc})"
        ) from exc
    return model.eval()


def pixel_values(
    images: list[np.ndarray], size: int, device: torch.device, mode: str = "bilinear", antialias: bool = False
) -> torch.Tensor:
    """HxWx3 uint8 images -> normalised [B, 3, size, size] (resampled with ``mode``)."""
    batch = []
    for image in images:
        t = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)[None] / 255.0
        t = torch.nn.functional.interpolate(t, size=(size, size), mode=mode, align_corners=False, antialias=antialias)
        batch.append(t)
    x = torch.cat(batch)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).to(device)


def label_index(model: torch.nn.Module, category_ids: list[int], names: dict[int, str]) -> dict[int, int]:
    """COCO category id -> model class index: by label name when the model's id2label has it (pretrained COCO
    models), else the COCO id itself when it is a valid class index (models trained on this file)."""
    id2label = {int(k): str(v).lower() for k, v in (getattr(model.config, "id2label", None) or {}).items()}
    by_name = {v: k for k, v in id2label.items()}
    num_labels = int(getattr(model.config, "num_labels", len(id2label)))
    out = {}
    for cid in category_ids:
        name = names.get(cid, "").lower()
        if name in by_name:
            out[cid] = by_name[name]
        elif 0 <= cid < num_labels:
            out[cid] = cid
        else:
            raise ValueError(
                f"COCO category {cid} ({names.get(cid)!r}) matches no class of the detector (num_labels={num_labels})"
            )
    return out


def _xyxy_to_cxcywh(boxes: np.ndarray, h: int, w: int) -> torch.Tensor:
    b = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    cx, cy = (b[:, 0] + b[:, 2]) / 2 / w, (b[:, 1] + b[:, 3]) / 2 / h
    return torch.stack([cx, cy, (b[:, 2] - b[:, 0]) / w, (b[:, 3] - b[:, 1]) / h], dim=1).clamp(0, 1)


def hf_loss_fn(
    images: list[np.ndarray], gt: list[np.ndarray], det_cfg: DetectorConfig, info: dict[str, Any]
) -> Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]:
    """Loss over a batch of image indices: the detector's own set-prediction loss against the task's boxes."""

    def loss_fn(model: torch.nn.Module, idx: torch.Tensor) -> torch.Tensor:
        base = _unwrap(model)
        mapping = label_index(base, info["category_ids"], info.get("category_names", {}))
        cls = mapping[info["category_ids"][0]]
        device = next(model.parameters()).device
        picks = [int(i) for i in idx]
        labels = []
        for i in picks:
            h, w = images[i].shape[:2]
            boxes = _xyxy_to_cxcywh(gt[i], h, w).to(device)
            labels.append(
                {"class_labels": torch.full((len(boxes),), cls, dtype=torch.long, device=device), "boxes": boxes}
            )
        out = model(pixel_values=pixel_values([images[i] for i in picks], det_cfg.input_size, device), labels=labels)
        return out.loss

    return loss_fn


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _class_probs(model: torch.nn.Module, logits: torch.Tensor) -> torch.Tensor:
    # DETR and Table-Transformer have a "no object" class scored with softmax; the focal-loss family
    # (Conditional / Deformable DETR, RT-DETR, ...) scores every class with a sigmoid.
    if _unwrap(model).config.model_type in ("detr", "table-transformer", "yolos"):
        return logits.softmax(-1)[..., :-1]
    return logits.sigmoid()


@torch.no_grad()
def hf_detect(
    model: torch.nn.Module,
    images: list[np.ndarray],
    det_cfg: DetectorConfig,
    info: dict[str, Any],
    batch_size: int = 8,
) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[np.ndarray]]:
    """Per image: every query's box scored for the task's category (score >= ``score_threshold``),
    boxes in pixels (xyxy), and the COCO category id of each."""
    device = next(model.parameters()).device
    mapping = label_index(_unwrap(model), info["category_ids"], info.get("category_names", {}))
    results, labels = [], []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        out = model(pixel_values=pixel_values(chunk, det_cfg.input_size, device))
        probs = _class_probs(model, out.logits.float())
        for k, image in enumerate(chunk):
            h, w = image.shape[:2]
            cx, cy, bw, bh = out.pred_boxes[k].float().cpu().unbind(-1)
            xyxy = torch.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h], -1)
            boxes, scores, cats = [], [], []
            for cid, cls in mapping.items():
                s = probs[k, :, cls].cpu()
                keep = s >= det_cfg.score_threshold
                boxes.append(xyxy[keep])
                scores.append(s[keep])
                cats.append(torch.full((int(keep.sum()),), cid))
            results.append((torch.cat(boxes).numpy().astype(np.float64), torch.cat(scores).numpy().astype(np.float64)))
            labels.append(torch.cat(cats).numpy())
    return results, labels


@torch.no_grad()
def hf_hidden(model: torch.nn.Module, images: list[np.ndarray], det_cfg: DetectorConfig, batch_size: int = 8):
    """Decoder output (the detector's last hidden layer) averaged over queries, per image: [N, d_model]."""
    device = next(model.parameters()).device
    rows = []
    for start in range(0, len(images), batch_size):
        out = model(pixel_values=pixel_values(images[start : start + batch_size], det_cfg.input_size, device))
        rows.append(out.last_hidden_state.float().mean(1).cpu())
    return torch.cat(rows)
