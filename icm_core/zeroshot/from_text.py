"""An adapter for a category nobody fine-tuned: its task vector from its text alone, then one generator draw.

A generator records the kind of task vector it was trained on (``task_vector_kind`` in its sidecar, see
:mod:`icm_core.generator.task_vectors`) and, when its training vectors agreed on it, their config
(``task_vector_config``: number and length of the samples). A new category's vector is computed the same way:

* ``hidden_state:base:<model>``: paper Eq. 1 on that **base** model over k samples of the category's text
  (k = the generator's training ``num_samples`` unless given);
* ``description:<encoder>``: the embedding of the category's one-line description (its text is not used).

A generator trained on ``hidden_state:finetuned:*`` vectors (the paper's default, and the demo's) is refused: its
vectors need the category's own fine-tuned LoRA. Nothing here imports Prefect.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from icm_core.data.corpora.user import user_documents, user_files
from icm_core.data.text import DataError, normalise_text
from icm_core.data.tokens import token_blocks
from icm_core.generator.config import SampleConfig, TaskVectorConfig
from icm_core.generator.stages import sample_adapter
from icm_core.generator.task_vectors import (
    TaskVectorKindError,
    TextEncoder,
    kind_model,
    require_text_computable,
    task_vector_kind,
    text_hidden_state_vector,
    text_task_vector,
)
from icm_core.infra.io import ArtifactError, read_json, sidecar_path
from icm_core.models.base_model import load_base_model, load_tokenizer
from icm_core.models.config import ModelConfig


__all__ = [
    "TextVectorPlan",
    "generator_vector_settings",
    "plan_from_recorded",
    "plan_text_vector",
    "read_text_source",
    "text_adapter",
    "text_condition_label",
    "text_source_sha256",
    "text_vector",
]

logger = logging.getLogger("icm_lora.new_category")

DEFAULT_MAX_CHARS = 400_000
"""Characters of a new category's text read at most (as ``DataConfig.max_chars``): k samples need far fewer."""


@dataclass(frozen=True)
class TextVectorPlan:
    """How a new category's task vector is computed for one generator: the kind, the base model, the config."""

    kind: str
    model_cfg: ModelConfig
    tv_cfg: TaskVectorConfig

    @property
    def uses_text(self) -> bool:
        """True for base-model Eq. 1 (the category's text); False for a description embedding."""
        return self.tv_cfg.source == "hidden_state"


def generator_vector_settings(generator_path: str | Path) -> tuple[str | None, dict[str, Any] | None]:
    """The generator's recorded task-vector kind and config (either None when not recorded), from its sidecar
    (the tensors are not read).

    Raises:
        ArtifactError: The generator file or its sidecar is missing or unreadable (the message names it).
    """
    path = Path(generator_path)
    if not path.is_file():
        raise ArtifactError(f"{path}: generator file not found")
    meta = read_json(sidecar_path(path)).get("meta", {})
    if meta.get("kind") != "icm-lora-generator":
        raise ArtifactError(f"{path}: not an icm-lora generator (sidecar kind {meta.get('kind')!r})")
    kind, config = meta.get("task_vector_kind"), meta.get("task_vector_config")
    return (kind if isinstance(kind, str) else None), (config if isinstance(config, dict) else None)


def plan_text_vector(
    generator_path: str | Path,
    model_cfg: ModelConfig | None = None,
    num_samples: int | None = None,
    sample_tokens: int | None = None,
) -> TextVectorPlan:
    """The task-vector computation a new category needs for this generator.

    Args:
        generator_path: The generator ``.safetensors`` file.
        model_cfg: Device, dtype and loading settings of the base model; its ``name_or_path`` is replaced by the
            model the generator's kind names (the vector must come from that model).
        num_samples: k, the text samples averaged in Eq. 1 (default: the generator's training value, else
            ``TaskVectorConfig``'s).
        sample_tokens: Tokens per sample (default as for ``num_samples``).

    Raises:
        TaskVectorKindError: The generator's vectors cannot be computed from a new category's text (fine-tuned-model
            vectors, or no recorded kind); the message says to train with ``task_vector.hidden_from=base``.
    """
    recorded_kind, recorded = generator_vector_settings(generator_path)
    return plan_from_recorded(recorded_kind, recorded, generator_path, model_cfg, num_samples, sample_tokens)


def plan_from_recorded(
    recorded_kind: str | None,
    recorded: dict[str, Any] | None,
    where: str | Path,
    model_cfg: ModelConfig | None = None,
    num_samples: int | None = None,
    sample_tokens: int | None = None,
) -> TextVectorPlan:
    """:func:`plan_text_vector` from a recorded kind and task-vector config (a generator's, or a serving
    library's); ``where`` names their source in errors."""
    kind = require_text_computable(recorded_kind, where)
    settings = dict(recorded or {})
    if num_samples is not None:
        settings["num_samples"] = num_samples
    if sample_tokens is not None:
        settings["sample_tokens"] = sample_tokens
    model_cfg = model_cfg or ModelConfig()
    model_name = kind_model(kind)
    if model_name is None:  # description:<encoder>
        settings.update(source="description", text_encoder=kind.split(":", 1)[1])
    else:
        settings.update(source="hidden_state", hidden_from="base")
        model_cfg = ModelConfig.model_validate({**model_cfg.model_dump(), "name_or_path": model_name})
    tv_cfg = TaskVectorConfig.model_validate(settings)
    if task_vector_kind(tv_cfg, model_cfg.name_or_path) != kind:  # pragma: no cover - guards the parsing above
        raise TaskVectorKindError(f"{where}: cannot reproduce task-vector kind {kind!r}")
    return TextVectorPlan(kind=kind, model_cfg=model_cfg, tv_cfg=tv_cfg)


def _source_files(path: Path) -> list[Path]:
    if not path.exists():
        raise DataError(f"{path}: no such file or folder (the new category's text)")
    if path.is_dir():
        files = user_files(path, "text")
        if not files:
            raise DataError(f"{path}: the folder holds no .txt files (the new category's text)")
        return files
    if not path.is_file():
        raise DataError(f"{path}: not a regular file or folder")
    return [path]


def read_text_source(path: str | Path, max_chars: int = DEFAULT_MAX_CHARS) -> list[str]:
    """A new category's documents: a ``.txt`` file (documents separated by blank lines), a ``.jsonl`` file
    (``text`` field) or a folder of ``.txt`` files (one document per file), read as category sources are
    (:mod:`icm_core.data.corpora.user`), normalised, de-duplicated, capped at ``max_chars`` characters.

    Raises:
        DataError: The path is missing, unreadable, not UTF-8, or holds no text; the message names the path.
    """
    path = Path(path).expanduser()
    files = _source_files(path)
    for file in files:  # an unreadable file fails here, named, before anything is computed
        try:
            with open(file, "rb"):
                pass
        except OSError as exc:
            raise DataError(f"{file}: cannot read ({exc.strerror or exc})") from exc
    docs: list[str] = []
    seen: set[str] = set()
    total = 0
    try:
        for raw in user_documents("new-category", str(path)):
            doc = normalise_text(raw)
            if not doc or doc in seen:
                continue
            doc = doc[: max_chars - total]
            seen.add(doc)
            docs.append(doc)
            total += len(doc)
            if total >= max_chars:
                break
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if total == 0:
        raise DataError(f"{path}: no text (empty or whitespace only); a task vector needs the category's text")
    return docs


def text_source_sha256(path: str | Path) -> str:
    """sha256 over the files a text source reads (names relative to the source, and bytes)."""
    path = Path(path).expanduser()
    digest = hashlib.sha256()
    for file in _source_files(path):
        digest.update((file.relative_to(path).as_posix() if path.is_dir() else file.name).encode() + b"\0")
        digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


def text_condition_label(text_path: str | Path, plan: TextVectorPlan, max_chars: int = DEFAULT_MAX_CHARS) -> str:
    """``text-<sha256[:12]>`` over the text's bytes and everything that decides its vector (kind, k, sample length,
    sample seed, characters read): two different texts or settings never share an output folder."""
    decided = {"kind": plan.kind, "tv": plan.tv_cfg.model_dump(mode="json"), "max_chars": max_chars}
    text = text_source_sha256(text_path) + json.dumps(decided, sort_keys=True)
    return f"text-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def text_vector(plan: TextVectorPlan, texts: Sequence[str], where: str | Path) -> tuple[torch.Tensor, int]:
    """Eq. 1 on the base model over k samples of ``texts``; returns the vector and the samples used (fewer than
    k when the text is short: logged).

    Raises:
        DataError: The text gives fewer tokens than one sample (``task_vector.sample_tokens``); names ``where``.
    """
    tv = plan.tv_cfg
    tokenizer = load_tokenizer(plan.model_cfg)
    try:
        blocks = token_blocks(texts, tokenizer, tv.sample_tokens)
    except DataError as exc:
        raise DataError(
            f"{where}: too little text for one sample of {tv.sample_tokens} tokens ({exc}); the new category needs "
            f"at least {tv.num_samples} x {tv.sample_tokens} tokens for the k={tv.num_samples} samples"
        ) from exc
    used = min(tv.num_samples, int(blocks.shape[0]))
    if used < tv.num_samples:
        logger.warning(
            "%s: only %d samples of %d tokens (k=%d asked); the task vector averages %d",
            where, used, tv.sample_tokens, tv.num_samples, used,
        )  # fmt: skip
    model = load_base_model(plan.model_cfg)
    return text_hidden_state_vector(model, tokenizer, texts, tv.num_samples, tv.sample_tokens, tv.seed), used


def text_adapter(
    generator_path: str | Path,
    out_dir: str | Path,
    sample_cfg: SampleConfig,
    text_path: str | Path | None = None,
    description: str | None = None,
    model_cfg: ModelConfig | None = None,
    num_samples: int | None = None,
    sample_tokens: int | None = None,
    max_chars: int = DEFAULT_MAX_CHARS,
    base_model: str | None = None,
) -> dict[str, Any]:
    """Write a PEFT adapter for a new category from its text (or, for a description-vector generator, its
    description). Every input is checked, and the vector computed, before anything is written; the adapter
    folder is written atomically.

    Args:
        generator_path: The generator ``.safetensors`` file.
        out_dir: The adapter folder to write.
        sample_cfg: Seed of z and number of draws.
        text_path: The category's text: a ``.txt`` / ``.jsonl`` file or a folder of ``.txt`` files.
        description: The category's one-line description (description-vector generators).
        model_cfg, num_samples, sample_tokens: See :func:`plan_text_vector`.
        max_chars: Characters of text read at most.
        base_model: The adapter's ``base_model_name_or_path`` (default: what the generator's training recorded).

    Raises:
        TaskVectorKindError: The generator's vectors need a fine-tune (see :func:`plan_text_vector`).
        DataError: The text is missing, unreadable, empty or too short (the message names the path).
        ValueError: The generator needs the other input (text vs description).
    """
    plan = plan_text_vector(generator_path, model_cfg, num_samples, sample_tokens)
    started = time.perf_counter()
    if plan.uses_text:
        if text_path is None:
            raise ValueError(f"{generator_path}: trained on {plan.kind!r} vectors; give the category's text")
        vector, used = text_vector(plan, read_text_source(text_path, max_chars), text_path)
        source = str(text_path)
    else:
        if not description:
            raise ValueError(
                f"{generator_path}: trained on description vectors ({plan.kind!r}); give the category's one-line "
                "description (--description), not its text"
            )
        encoder = TextEncoder(plan.tv_cfg.text_encoder, trust_remote_code=plan.tv_cfg.text_encoder_trust_remote_code)
        vector, used, source = text_task_vector(description, encoder), 0, "description"
    vector_seconds = time.perf_counter() - started
    result = sample_adapter(
        generator_path,
        out_dir,
        sample_cfg,
        task_vector=vector,
        task_vector_source=source,
        task_vector_kind=plan.kind,
        base_model=base_model,
    )
    return {
        **result,
        "task_vector_kind": plan.kind,
        "task_vector_config": plan.tv_cfg.model_dump(mode="json"),
        "samples_used": used,
        "vector_seconds": vector_seconds,
    }
