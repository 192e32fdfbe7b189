"""MTCNN (facenet-pytorch's pretrained P/R/O-Nets) as a LoRA-tunable face detector.

* :func:`load_mtcnn` builds the three networks and loads the weights shipped in the facenet-pytorch wheel
  with ``torch.load(weights_only=True)`` (plain tensors; no pickled code runs).
* :func:`detect` runs facenet-pytorch's own cascade (``detect_face``) with its NMS routed through
  :mod:`icm_core.vision.nms`, so it works whether or not torchvision's C++ ops load.
* The differentiable training signal is the O-Net's: face/non-face log-loss and box regression on 48x48
  crops around ground-truth faces (positives and partial crops) and on background crops (negatives), cut
  exactly as the cascade cuts its O-Net inputs (:func:`onet_crops`).
* :func:`onet_hidden` is the O-Net's last hidden layer (``prelu5``, 256-d): what a detection task vector
  averages.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn


ONET_SIZE = 48


class ModelLoadError(RuntimeError):
    """The detector's weights or code could not be loaded."""


def facenet_folder() -> Path:
    """The installed facenet-pytorch package folder (found without importing it)."""
    spec = importlib.util.find_spec("facenet_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("facenet-pytorch is not installed: `uv pip install --no-deps facenet-pytorch==2.6.0`")
    return Path(next(iter(spec.submodule_search_locations)))


def _route_nms() -> None:
    """Point facenet's cascade at our NMS (torchvision's when its ops run, pure torch otherwise)."""
    from facenet_pytorch.models.utils import detect_face as module

    from icm_core.vision.nms import batched_nms

    module.batched_nms = batched_nms


class MTCNNDetector(nn.Module):
    """The three MTCNN networks as one module, so peft can target ``onet.dense5`` etc. by name."""

    def __init__(self, pnet: nn.Module, rnet: nn.Module, onet: nn.Module):
        super().__init__()
        self.pnet, self.rnet, self.onet = pnet, rnet, onet

    def forward(self, crops: torch.Tensor):
        """The O-Net on normalised 48x48 crops: (box regression [N,4], landmarks [N,10], face prob [N,2])."""
        return self.onet(crops)


def load_mtcnn(weights_dir: str | Path | None = None) -> MTCNNDetector:
    """MTCNN with its pretrained weights (facenet-pytorch's ``data/{p,r,o}net.pt`` or ``weights_dir``)."""
    from facenet_pytorch.models.mtcnn import ONet, PNet, RNet

    _route_nms()
    folder = Path(weights_dir) if weights_dir is not None else facenet_folder() / "data"
    nets = []
    for cls, name in ((PNet, "pnet"), (RNet, "rnet"), (ONet, "onet")):
        path = folder / f"{name}.pt"
        if not path.is_file():
            raise ModelLoadError(f"{path}: MTCNN weights not found")
        net = cls(pretrained=False)
        try:
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as exc:
            raise ModelLoadError(f"{path}: not a loadable {name} state dict ({exc})") from exc
        nets.append(net.eval())
    return MTCNNDetector(*nets).eval()


@dataclass(frozen=True)
class CascadeConfig:
    """MTCNN cascade settings (facenet-pytorch's defaults)."""

    min_face_size: int = 20
    thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)
    factor: float = 0.709


@torch.no_grad()
def detect(
    detector: nn.Module, images: list[np.ndarray], cascade: CascadeConfig | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Detect faces in HxWx3 uint8 images; per image (boxes [K,4] xyxy float, scores [K])."""
    from facenet_pytorch.models.utils.detect_face import detect_face

    cascade = cascade or CascadeConfig()
    _route_nms()
    nets = _plain_nets(detector)
    results = []
    for image in images:
        boxes, _ = detect_face(
            np.ascontiguousarray(image[None]),
            cascade.min_face_size,
            nets.pnet,
            nets.rnet,
            nets.onet,
            list(cascade.thresholds),
            cascade.factor,
            "cpu",
        )
        found = np.asarray(boxes[0], dtype=np.float64).reshape(-1, 5)
        results.append((found[:, :4].copy(), found[:, 4].copy()))
    return results


def _plain_nets(detector: nn.Module) -> MTCNNDetector:
    """The MTCNNDetector inside a peft wrapper (or the detector itself)."""
    if isinstance(detector, MTCNNDetector):
        return detector
    for module in detector.modules():
        if isinstance(module, MTCNNDetector):
            return module
    raise TypeError(f"{type(detector).__name__} holds no MTCNNDetector")


def onet_crops(image: np.ndarray, boxes: np.ndarray) -> torch.Tensor:
    """Cut boxes [N,4] (xyxy) from an HxWx3 uint8 image the way facenet's cascade cuts O-Net inputs:
    coordinates truncated and clipped to the image (1-based, as ``pad``), area-resampled to 48x48,
    normalised with (x - 127.5) / 128. Returns [N,3,48,48]."""
    from facenet_pytorch.models.utils.detect_face import imresample, pad

    h, w = image.shape[:2]
    tensor = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1).unsqueeze(0)
    y, ey, x, ex = pad(torch.as_tensor(boxes, dtype=torch.float32).clone(), w, h)
    crops = []
    for k in range(len(y)):
        patch = tensor[:, :, max(y[k] - 1, 0) : max(ey[k], y[k]), max(x[k] - 1, 0) : max(ex[k], x[k])]
        if patch.shape[2] == 0 or patch.shape[3] == 0:
            patch = torch.zeros(1, 3, 1, 1)
        crops.append(imresample(patch, (ONET_SIZE, ONET_SIZE)))
    if not crops:
        return torch.zeros(0, 3, ONET_SIZE, ONET_SIZE)
    return (torch.cat(crops) - 127.5) * 0.0078125


def regression_targets(crop_boxes: np.ndarray, gt_boxes: np.ndarray) -> np.ndarray:
    """O-Net box-regression targets in facenet's ``bbreg`` convention: gt = box + reg * (size + 1)."""
    w = crop_boxes[:, 2] - crop_boxes[:, 0] + 1
    h = crop_boxes[:, 3] - crop_boxes[:, 1] + 1
    scale = np.stack([w, h, w, h], axis=1)
    return (gt_boxes - crop_boxes) / scale


def onet_loss(
    model: nn.Module, crops: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor, box_weight: float
) -> torch.Tensor:
    """MTCNN's O-Net training loss: face log-loss on positives (1) and negatives (0) + ``box_weight`` * squared
    box-regression error on positives and partial crops (label -1 = part: regression only)."""
    reg, _, prob = model(crops)
    cls_mask = labels >= 0
    log_prob = torch.log(prob.clamp_min(1e-7))
    cls_loss = nn.functional.nll_loss(log_prob[cls_mask], labels[cls_mask].long()) if cls_mask.any() else reg.sum() * 0
    box_mask = labels != 0
    box_loss = (reg[box_mask] - targets[box_mask]).pow(2).sum(1).mean() if box_mask.any() else reg.sum() * 0
    return cls_loss + box_weight * box_loss


@torch.no_grad()
def onet_hidden(detector: nn.Module, crops: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The O-Net's last hidden layer (``prelu5`` output, 256-d) for each crop: [N, 256]."""
    nets = _plain_nets(detector)
    captured: list[torch.Tensor] = []
    handle = nets.onet.prelu5.register_forward_hook(lambda _m, _i, out: captured.append(out.detach().float()))
    try:
        for batch in crops.split(batch_size):
            detector(batch)
    finally:
        handle.remove()
    return torch.cat(captured) if captured else torch.zeros(0, 256)
