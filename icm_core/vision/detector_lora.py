"""LoRA on a detector: peft config for its layers, the training loop, and the MTCNN training samples.

The trajectory written here has the language pipeline's format (``checkpoint-XXXXXX.safetensors`` +
sidecars, ``trajectory.json``, ``adapter/``), so the generator, Model Soup and COND P-DIFF stages read
detector trajectories unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from icm_core.infra.resume import Resumer
from icm_core.lora.train import fit_lora_trajectory
from icm_core.lora.trajectory import Trajectory
from icm_core.vision.config import DetectionLoraConfig
from icm_core.vision.mtcnn import onet_crops, regression_targets


def detector_lora_config(cfg: DetectionLoraConfig, base_model_id: str):
    """peft ``LoraConfig`` for a detector: Linear and Conv2d layers named by ``target_modules`` suffixes."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
        base_model_name_or_path=base_model_id,
    )


def train_detector_lora(
    base_model: torch.nn.Module,
    num_samples: int,
    loss_fn: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor],
    cfg: DetectionLoraConfig,
    out_dir: str | Path,
    base_model_id: str,
    on_step: Callable[[int, float], None] | None = None,
    resume: Resumer | None = None,
) -> Trajectory:
    """Fine-tune LoRA on ``base_model`` (wrapped in place) with ``loss_fn(model, sample_indices)``; save the
    last ``trajectory_size`` checkpoints and the final adapter under ``out_dir`` (``resume``: saved state to
    continue from, see ``fit_lora_trajectory``)."""
    from peft import get_peft_model

    out_dir = Path(out_dir)
    if num_samples <= 0:
        raise ValueError("no training samples for this task")
    # 1) Seed before wrapping, so every task starts from the same LoRA initialisation.
    torch.manual_seed(cfg.seed)
    model = get_peft_model(base_model, detector_lora_config(cfg, base_model_id))
    model.train()
    order = torch.Generator().manual_seed(cfg.seed)

    def batches():
        while True:
            yield from torch.randperm(num_samples, generator=order).split(cfg.batch_size)

    # 2) The language pipeline's loop: the last checkpoints are the generator's training data.
    return fit_lora_trajectory(model, batches(), loss_fn, cfg, out_dir, base_model_id, on_step, resume)


@dataclass
class CropSet:
    """MTCNN training samples: R-Net (24x24) and O-Net (48x48) crops of the same boxes, with labels
    (1 face, 0 background, -1 partial face: regression only) and box-regression targets."""

    rnet: torch.Tensor
    onet: torch.Tensor
    labels: torch.Tensor
    targets: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def _iou_one(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    lt = np.maximum(box[:2], boxes[:, :2])
    rb = np.minimum(box[2:], boxes[:, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=1)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / (area + areas - inter)


def sample_crop_boxes(
    gt_boxes: np.ndarray, image_size: tuple[int, int], cfg: DetectionLoraConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MTCNN-style crop boxes for one image: jittered squares around each face (positives, IoU >= 0.65;
    parts, 0.4-0.65) and random squares away from every face (negatives, IoU < 0.3).

    Returns (boxes [N,4] xyxy, labels [N], matched gt boxes [N,4] (zeros for negatives))."""
    h, w = image_size
    boxes, labels, matched = [], [], []
    for gt in gt_boxes:
        side = max(gt[2] - gt[0], gt[3] - gt[1])
        want = {1: cfg.positives_per_face, -1: cfg.parts_per_face}
        for _ in range(400):
            if not any(want.values()):
                break
            s = side * rng.uniform(0.8, 1.25)
            cx = (gt[0] + gt[2]) / 2 + rng.uniform(-0.25, 0.25) * side
            cy = (gt[1] + gt[3]) / 2 + rng.uniform(-0.25, 0.25) * side
            box = np.round([cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2])
            iou = float(_iou_one(box, gt[None])[0])
            label = 1 if iou >= 0.65 else -1 if 0.4 <= iou < 0.65 else None
            if label is not None and want[label] > 0:
                want[label] -= 1
                boxes.append(box)
                labels.append(label)
                matched.append(gt)
    found = 0
    for _ in range(50 * max(cfg.negatives_per_image, 1)):
        if found >= cfg.negatives_per_image:
            break
        s = rng.uniform(20, max(21, min(h, w) * 0.6))
        x, y = rng.uniform(0, w - s), rng.uniform(0, h - s)
        box = np.round([x, y, x + s, y + s])
        if len(gt_boxes) == 0 or float(_iou_one(box, np.asarray(gt_boxes)).max()) < 0.3:
            boxes.append(box)
            labels.append(0)
            matched.append(np.zeros(4))
            found += 1
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4), np.asarray(labels), np.asarray(matched).reshape(-1, 4)


def mtcnn_crop_set(images: list[np.ndarray], gt: list[np.ndarray], cfg: DetectionLoraConfig) -> CropSet:
    """The training crops of a task's images (seeded by ``cfg.seed``)."""
    from facenet_pytorch.models.utils.detect_face import imresample

    rng = np.random.default_rng(cfg.seed)
    onet, labels, targets = [], [], []
    for image, boxes in zip(images, gt, strict=True):
        crop_boxes, crop_labels, matched = sample_crop_boxes(
            np.asarray(boxes).reshape(-1, 4), image.shape[:2], cfg, rng
        )
        if len(crop_boxes) == 0:
            continue
        onet.append(onet_crops(image, crop_boxes))
        labels.append(torch.as_tensor(crop_labels, dtype=torch.long))
        reg = np.where(crop_labels[:, None] != 0, regression_targets(crop_boxes, matched), 0.0)
        targets.append(torch.as_tensor(reg, dtype=torch.float32))
    onet_t = torch.cat(onet)
    # R-Net inputs are the same crops at 24x24 (the cascade area-resamples both from the image; resampling the
    # 48x48 crop by 2 is the same area average up to the 48x48 rounding).
    rnet_t = imresample(onet_t, (24, 24))
    return CropSet(rnet_t, onet_t, torch.cat(labels), torch.cat(targets))


def mtcnn_loss_fn(crops: CropSet, box_weight: float) -> Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]:
    """Loss over a batch of crop indices: the O-Net's and the R-Net's face log-loss + box regression."""
    from icm_core.vision.mtcnn import _plain_nets

    def head_loss(reg: torch.Tensor, prob: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor):
        cls_mask = labels >= 0
        loss = reg.sum() * 0
        if cls_mask.any():
            loss = loss + torch.nn.functional.nll_loss(torch.log(prob[cls_mask].clamp_min(1e-7)), labels[cls_mask])
        box_mask = labels != 0
        if box_mask.any():
            loss = loss + box_weight * (reg[box_mask] - targets[box_mask]).pow(2).sum(1).mean()
        return loss

    def loss_fn(model: torch.nn.Module, idx: torch.Tensor) -> torch.Tensor:
        nets = _plain_nets(model)
        labels, targets = crops.labels[idx], crops.targets[idx]
        o_reg, _, o_prob = nets.onet(crops.onet[idx])
        r_reg, r_prob = nets.rnet(crops.rnet[idx])
        return head_loss(o_reg, o_prob, labels, targets) + head_loss(r_reg, r_prob, labels, targets)

    return loss_fn
