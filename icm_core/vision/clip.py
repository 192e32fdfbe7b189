"""CLIP task vectors through open_clip (the paper's Table 6): a text embedding of the task description and
the mean image embedding of the task's images.

No CLIP weights ship in any installable package: give the path of an open_clip checkpoint (``.pt``/``.bin``
state dict or ``.safetensors``) for the architecture named by ``model_name`` (e.g. ``ViT-B-32``). Model
configs that open_clip does not know can be registered with :func:`register_model_config` (a JSON file in
open_clip's config format). Tests use a tiny registered config with random weights.

open_clip imports torchvision at module level; ``icm_core`` has already made that import safe (see
``icm_core/models/torchvision_compat.py``), and CLIP needs none of torchvision's C++ ops.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


class ClipError(ValueError):
    """A CLIP model or checkpoint could not be loaded; the message names it."""


def register_model_config(path: str | Path) -> str:
    """Register an open_clip model config JSON (file name without .json = model name); returns the name."""
    import open_clip

    path = Path(path)
    if not path.is_file():
        raise ClipError(f"{path}: CLIP model config not found")
    open_clip.add_model_config(path)
    return path.stem


class ClipEncoder:
    """An open_clip model with its image preprocessing and tokenizer, in eval mode.

    Args:
        model_name: open_clip architecture name (``ViT-B-32``, ... or a registered config).
        checkpoint: Path of the weights. None only with ``allow_random_init`` (tests, smoke runs).
        device: Torch device.
        allow_random_init: Build the model with random weights when no checkpoint is given.
    """

    def __init__(
        self, model_name: str, checkpoint: str | Path | None, device: str = "cpu", allow_random_init: bool = False
    ):
        import open_clip

        if checkpoint is None and not allow_random_init:
            raise ClipError(
                "task_vector.clip_checkpoint: a CLIP checkpoint path is required (no CLIP weights ship with this "
                "project); pass the open_clip weights file for model " + repr(model_name)
            )
        if checkpoint is not None and not Path(checkpoint).is_file():
            raise ClipError(f"{checkpoint}: CLIP checkpoint not found")
        if open_clip.get_model_config(model_name) is None:
            raise ClipError(f"{model_name!r}: unknown open_clip model; register its config JSON first")
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=str(checkpoint) if checkpoint is not None else None, device=device
            )
        except Exception as exc:  # open_clip raises RuntimeError / KeyError for mismatched weights
            raise ClipError(f"{checkpoint}: not a loadable {model_name} checkpoint ({exc})") from exc
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.device = torch.device(device)

    @property
    def dim(self) -> int:
        """Size of the joint embedding."""
        return (
            int(self.model.text_projection.shape[1])
            if getattr(self.model, "text_projection", None) is not None
            else int(self.text_vector("x").shape[0])
        )

    @torch.no_grad()
    def text_vector(self, description: str) -> torch.Tensor:
        """Unit-norm CLIP text embedding of one task description: [dim]."""
        if not description.strip():
            raise ClipError("empty task description")
        tokens = self.tokenizer([description]).to(self.device)
        features = self.model.encode_text(tokens).float()
        return torch.nn.functional.normalize(features, dim=-1)[0].cpu()

    @torch.no_grad()
    def image_vectors(self, images: list[np.ndarray], batch_size: int = 32) -> torch.Tensor:
        """Unit-norm CLIP image embeddings of HxWx3 uint8 images: [N, dim]."""
        from PIL import Image

        if not images:
            raise ClipError("no images to embed")
        rows = []
        for start in range(0, len(images), batch_size):
            batch = torch.stack([self.preprocess(Image.fromarray(im)) for im in images[start : start + batch_size]])
            features = self.model.encode_image(batch.to(self.device)).float()
            rows.append(torch.nn.functional.normalize(features, dim=-1).cpu())
        return torch.cat(rows)

    def image_vector(self, images: list[np.ndarray]) -> torch.Tensor:
        """Mean unit-norm image embedding of a task's images, re-normalised: [dim]."""
        return torch.nn.functional.normalize(self.image_vectors(images).mean(0), dim=0)
