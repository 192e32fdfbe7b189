"""Non-maximum suppression that works with or without torchvision's compiled ops.

torchvision's ``nms`` is a C++ op. Under the CPU-torch + CUDA-torchvision install this project copes with
(see ``icm_core/models/torchvision_compat.py``) the op has a schema but no kernel, so MTCNN's cascade, which calls
``torchvision.ops.boxes.batched_nms``, would fail. :func:`batched_nms` uses torchvision when its ops run
and an exact pure-torch greedy NMS otherwise; both keep the same boxes (tests compare them with a
brute-force reference).
"""

from __future__ import annotations

import numpy as np
import torch

from icm_core.models.torchvision_compat import torchvision_ops_available


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU matrix [N, M] of xyxy boxes, areas without the +1 pixel convention (as torchvision)."""
    area_a = (a[:, 2] - a[:, 0]).clamp_min(0) * (a[:, 3] - a[:, 1]).clamp_min(0)
    area_b = (b[:, 2] - b[:, 0]).clamp_min(0) * (b[:, 3] - b[:, 1]).clamp_min(0)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp_min(0).prod(dim=2)
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1e-12), torch.zeros_like(inter))


def nms_torch(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS in pure torch: indices of kept boxes, highest score first (torchvision's semantics:
    a box is dropped when its IoU with a kept, higher-scoring box is > ``iou_threshold``)."""
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    # Stable descending sort so ties keep index order, as torchvision's CPU kernel does.
    order = torch.sort(scores, descending=True, stable=True).indices
    suppress = (box_iou(boxes[order], boxes[order]) > iou_threshold).cpu().numpy()
    removed = np.zeros(len(order), dtype=bool)
    keep = []
    for i in range(len(order)):
        if removed[i]:
            continue
        keep.append(i)
        # Marks earlier boxes too; they are already decided and never revisited.
        removed |= suppress[i]
    return order[torch.as_tensor(keep, dtype=torch.long, device=order.device)]


def batched_nms_torch(
    boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """NMS independently per value of ``idxs`` (image or class), by offsetting each group's boxes apart."""
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    offsets = idxs.to(boxes) * (boxes.max() - boxes.min() + 1)
    return nms_torch(boxes + offsets[:, None], scores, iou_threshold)


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """torchvision's ``batched_nms`` when its ops run here, the pure-torch one otherwise."""
    if torchvision_ops_available():
        from torchvision.ops import batched_nms as native

        return native(boxes, scores, idxs, iou_threshold)
    return batched_nms_torch(boxes, scores, idxs, iou_threshold)
