"""The pure-torch NMS MTCNN falls back on keeps exactly what a brute-force greedy NMS keeps."""

from __future__ import annotations

import pytest
import torch

from icm_core.models.torchvision_compat import torchvision_ops_available
from icm_core.vision.nms import batched_nms, batched_nms_torch, box_iou, nms_torch


def brute_force_nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float) -> list[int]:
    """Textbook greedy NMS, one pair at a time in plain Python."""

    def iou(a, b):
        ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = ix * iy
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        return inter / union if union > 0 else 0.0

    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    keep: list[int] = []
    for i in order:
        if all(iou(boxes[i].tolist(), boxes[k].tolist()) <= threshold for k in keep):
            keep.append(i)
    return keep


def random_boxes(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 100
    wh = torch.rand(n, 2, generator=g) * 40 + 1
    scores = torch.rand(n, generator=g).round(decimals=1)  # many ties
    return torch.cat([xy, xy + wh], dim=1).double(), scores.double()


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 0.7, 0.95])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nms_matches_brute_force(threshold, seed):
    boxes, scores = random_boxes(60, seed)
    assert nms_torch(boxes, scores, threshold).tolist() == brute_force_nms(boxes, scores, threshold)


def test_batched_nms_is_nms_per_group():
    boxes, scores = random_boxes(80, 7)
    groups = torch.arange(80) % 3
    kept = set(batched_nms_torch(boxes, scores, groups, 0.4).tolist())
    expected = set()
    for g in range(3):
        idx = torch.nonzero(groups == g).flatten()
        expected |= {int(idx[k]) for k in brute_force_nms(boxes[idx], scores[idx], 0.4)}
    assert kept == expected


def test_empty_and_iou():
    empty = torch.zeros(0, 4)
    assert nms_torch(empty, torch.zeros(0), 0.5).numel() == 0
    assert batched_nms(empty, torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5).numel() == 0
    a = torch.tensor([[0.0, 0, 10, 10]])
    b = torch.tensor([[5.0, 0, 15, 10], [20.0, 20, 30, 30]])
    assert torch.allclose(box_iou(a, b), torch.tensor([[50 / 150, 0.0]]))


@pytest.mark.skipif(not torchvision_ops_available(), reason="torchvision's C++ ops do not load on this install")
def test_matches_torchvision_when_available():
    from torchvision.ops import batched_nms as native

    boxes, scores = random_boxes(100, 3)
    scores = scores + torch.rand(100, dtype=torch.float64) * 1e-3  # torchvision breaks ties differently
    groups = torch.arange(100) % 4
    assert set(native(boxes, scores, groups, 0.5).tolist()) == set(
        batched_nms_torch(boxes, scores, groups, 0.5).tolist()
    )
