"""Frozen layers run once: the hidden states entering a decoder layer, computed once per block and reused.

An adapter in decoder layers ``start..`` leaves layers ``< start`` (and the embedding) as the base model has them,
so the states entering layer ``start`` depend only on the base model and the block. Whoever passes the same blocks
through those layers more than once (a fine-tune over several epochs, many adapters scored on one block set,
few-step fine-tunes, repeated seeds) asks :func:`block_states` and runs only the layers from ``start`` up
(:func:`layers_from`, with ``inputs_embeds``).

The states are kept per model object (least recently used block sets dropped first) and keyed by the block
content, the layer, and the in-place version counters of every parameter below ``start``: a weight changed in
place there (an adapter merged below ``start``, a ``load_state_dict``) invalidates them. With ``store`` they are
also kept under a folder (safetensors, written atomically) keyed by a model identity string the caller vouches
for (``icm_core.models.base_model.model_identity``), the block content and the layer, so another process
reuses them.
"""

from __future__ import annotations

import hashlib
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from icm_core.infra.io import load_tensors, save_tensors


PREFIX_CACHE_ENTRIES = 16
"""Block sets whose states a process keeps per model (least recently used dropped first)."""

_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _PrefixDone(Exception):
    """Raised by the capture hook: the layers after the captured one are not needed."""


def decoder_stack(model: torch.nn.Module) -> torch.nn.Module | None:
    """The inner decoder of a transformers causal LM (``model.model``; a peft wrapper is looked through) when it has
    a ``layers`` ModuleList and an ``embed_tokens`` (Llama, Mistral, Qwen, SmolLM, ...); ``None`` otherwise (callers
    then run whole forwards)."""
    get_base = getattr(model, "get_base_model", None)
    lm = get_base() if callable(get_base) else model
    inner = getattr(lm, "model", None)
    if isinstance(getattr(inner, "layers", None), torch.nn.ModuleList) and hasattr(inner, "embed_tokens"):
        return inner
    return None


def blocks_digest(input_ids: torch.Tensor) -> str:
    """sha256 of a block tensor's shape and token ids (the cache's block-content key)."""
    ids = input_ids.detach().to("cpu", torch.long).contiguous()
    return hashlib.sha256(repr(tuple(ids.shape)).encode() + ids.numpy().tobytes()).hexdigest()


def _prefix_versions(inner: torch.nn.Module, start: int) -> tuple:
    params = list(inner.embed_tokens.parameters())
    for layer in list(inner.layers)[:start]:
        params += list(layer.parameters())
    return tuple((id(p), p._version) for p in params)


@torch.no_grad()
def _run_prefix(model: torch.nn.Module, input_ids: torch.Tensor, start: int, batch_size: int) -> torch.Tensor:
    """The model's own forward, stopped by a hook at the input of layer ``start``; [N, T, hidden]."""
    inner = decoder_stack(model)
    device = next(model.parameters()).device
    captured: list[torch.Tensor] = []

    def keep(module, args, kwargs):
        captured.append((args[0] if args else kwargs["hidden_states"]).detach().clone())
        raise _PrefixDone

    handle = inner.layers[start].register_forward_pre_hook(keep, with_kwargs=True)
    try:
        for batch in input_ids.split(batch_size):
            try:
                inner(input_ids=batch.to(device), use_cache=False)
            except _PrefixDone:
                pass
    finally:
        handle.remove()
    return torch.cat(captured)


def block_states(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    start: int,
    batch_size: int = 8,
    store: str | Path | None = None,
    model_id: str | None = None,
) -> torch.Tensor:
    """The hidden states entering decoder layer ``start`` for every block of ``input_ids`` [N, T]: [N, T, hidden].

    Computed once (in batches of ``batch_size``, under no_grad) and then served from the cache described in the
    module docstring. ``store`` (a folder) with ``model_id`` also keeps them on disk.

    Raises:
        ValueError: The model has no decoder stack this works on, or ``start`` is not one of its layers.
    """
    inner = decoder_stack(model)
    if inner is None:
        raise ValueError(f"{type(model).__name__} has no decoder layer stack (model.layers, embed_tokens)")
    if not 0 < start < len(inner.layers):
        raise ValueError(f"start layer {start} is not in 1..{len(inner.layers) - 1}")
    digest = blocks_digest(input_ids)
    key = (start, batch_size, digest, _prefix_versions(inner, start))
    per_model = _CACHE.setdefault(model, OrderedDict())
    if key in per_model:
        per_model.move_to_end(key)
        return per_model[key]
    path = None
    if store is not None and model_id is not None:
        name = hashlib.sha256(f"{model_id}|{start}|{batch_size}|{digest}".encode()).hexdigest()[:32]
        path = Path(store) / f"prefix-{name}.safetensors"
    if path is not None and path.is_file():
        states = load_tensors(path)[0]["states"]
    else:
        states = _run_prefix(model, input_ids, start, batch_size)
        if path is not None:
            save_tensors(path, {"states": states}, {"model": model_id, "layer": start, "blocks_sha256": digest})
    per_model[key] = states
    while len(per_model) > PREFIX_CACHE_ENTRIES:
        per_model.popitem(last=False)
    return states


@contextmanager
def layers_from(model: torch.nn.Module, start: int) -> Iterator[torch.nn.Module]:
    """For the ``with`` block the decoder runs only layers ``start..`` (its input: ``inputs_embeds`` = the states
    entering layer ``start``); the full layer list is put back afterwards. Keep the block to the forward pass:
    parameter names inside it are those of the shortened list."""
    inner = decoder_stack(model)
    full = inner.layers
    inner.layers = torch.nn.ModuleList(list(full)[start:])
    try:
        yield model
    finally:
        inner.layers = full
