"""Standard PEFT adapter folders: build LoRA models, read/write ``adapter_config.json`` +
``adapter_model.safetensors``, and merge an adapter into its base model."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from icm_core.infra.io import ArtifactError, atomic_folder, check_finite, check_safetensors_file, sha256_file
from icm_core.lora.config import LoraTrainConfig


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = "adapter_model.bin"


def lora_config_for(model: torch.nn.Module, cfg: LoraTrainConfig, base_model_id: str):
    """peft ``LoraConfig`` for a causal LM; ``last_n_layers`` becomes ``layers_to_transform``."""
    from peft import LoraConfig

    layers = None
    if cfg.last_n_layers is not None:
        num_layers = getattr(model.config, "num_hidden_layers", None)
        if num_layers is None:
            raise ValueError("last_n_layers: the model config has no num_hidden_layers; set last_n_layers to null")
        layers = list(range(max(0, num_layers - cfg.last_n_layers), num_layers))
    return LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        layers_to_transform=layers,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_id,
    )


def adapter_config_dict(peft_model, base_model_id: str, adapter_name: str = "default") -> dict[str, Any]:
    """JSON-ready adapter config as peft writes it, naming ``base_model_id`` as its base model.

    peft rewrites ``base_model_name_or_path`` to the folder the model was loaded from; we record the
    id the user gave (an alias, hub id or path), which is what adapters are checked against.
    """
    config = peft_model.peft_config[adapter_name].to_dict()
    config = json.loads(json.dumps(config, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))
    config["base_model_name_or_path"] = base_model_id
    return config


def lora_state_dict(peft_model) -> dict[str, torch.Tensor]:
    """The adapter's weights with peft's saved key names (no adapter name), detached float32 CPU copies."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model)
    return {key: value.detach().to(torch.float32).cpu().clone() for key, value in state.items()}


def write_adapter(
    folder: str | Path,
    state_dict: dict[str, torch.Tensor],
    adapter_config: dict[str, Any],
    extra_json: dict[str, Any] | None = None,
) -> Path:
    """Write a PEFT adapter folder atomically (temp folder, then rename over any old one); ``extra_json`` maps
    file names to payloads written into the same folder (e.g. how the adapter was chosen; peft ignores them)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    for key, tensor in state_dict.items():
        if not bool(torch.isfinite(tensor).all()):
            raise ArtifactError(f"{folder}: adapter tensor {key!r} contains NaN or Inf; not written")
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    with atomic_folder(folder) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
        for name, payload in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    return folder


def read_adapter(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read an adapter folder's weights (safetensors only, never pickles) and config."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not config_path.is_file():
        raise ArtifactError(f"{config_path}: missing; not a PEFT adapter folder")
    if not weights_path.is_file() and (folder / PICKLE_WEIGHTS).is_file():
        raise ArtifactError(
            f"{folder / PICKLE_WEIGHTS}: adapter weights are a pickle; pickles are never loaded. Convert them to "
            f"{ADAPTER_WEIGHTS} (safetensors) first"
        )
    check_safetensors_file(weights_path)
    try:
        weights = load_file(str(weights_path))
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{config_path}: not valid JSON ({exc})") from exc
    except Exception as exc:  # safetensors raises its own error types
        raise ArtifactError(f"{weights_path}: cannot read safetensors ({exc})") from exc
    check_finite(weights, weights_path)
    return weights, config


def adapter_sha256(folder: str | Path) -> str:
    return sha256_file(Path(folder) / ADAPTER_WEIGHTS)


def check_adapter_base(adapter_config: dict[str, Any], base_model_id: str | Sequence[str], folder: str | Path) -> None:
    """Refuse an adapter made for another base model (its config names the base it was trained on).

    ``base_model_id`` is the base's name, or all names it goes by (alias, hub id, folder path).
    """
    names = [base_model_id] if isinstance(base_model_id, str) else list(base_model_id)
    made_for = adapter_config.get("base_model_name_or_path")
    if made_for and made_for not in names:
        raise ValueError(f"{folder}: adapter was made for base model {made_for!r}, not {names[0]!r}")


def load_adapter(base_model, folder: str | Path, base_model_id: str | Sequence[str] | None = None):
    """Wrap ``base_model`` with the adapter in ``folder`` (a PeftModel in eval mode)."""
    from peft import PeftModel

    _, config = read_adapter(folder)
    if base_model_id is not None:
        check_adapter_base(config, base_model_id, folder)
    try:
        model = PeftModel.from_pretrained(base_model, str(folder), is_trainable=False)
    except Exception as exc:
        raise ArtifactError(f"{folder}: adapter does not fit this base model ({exc})") from exc
    return model.eval()


def merge_adapter(base_model, folder: str | Path, base_model_id: str | Sequence[str] | None = None):
    """Merge the adapter in ``folder`` into ``base_model`` and return the plain merged model.

    ``base_model`` is modified in place; load a fresh base model per adapter.
    """
    return load_adapter(base_model, folder, base_model_id).merge_and_unload().eval()


PEFT_PREFIX = "base_model.model."


def _merge_plan(base_model, folder: Path, state: dict[str, torch.Tensor], config: dict[str, Any]):
    """(module, delta) pairs that merging the adapter adds to the base weights, checked against the model."""
    from icm_core.lora.arithmetic import merged_delta

    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora") or config.get("fan_in_fan_out"):
        return None  # not a plain LoRA: the caller falls back to peft's own merge
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        return None  # per-module ranks: peft knows them
    rank = int(config.get("r", 0))
    for key, tensor in state.items():
        got = tensor.shape[0] if ".lora_A." in key else tensor.shape[-1] if ".lora_B." in key else rank
        if got != rank:
            raise ArtifactError(
                f"{folder}: adapter does not fit this base model "
                f"({key} has rank {got}, adapter_config.json says r={rank})"
            )
    try:
        deltas = merged_delta(state, config)
    except (ValueError, KeyError) as exc:
        raise ArtifactError(f"{folder}: not a plain LoRA adapter ({exc})") from exc
    modules = dict(base_model.named_modules())
    plan = []
    for key, delta in deltas.items():
        name = key.removeprefix(PEFT_PREFIX)
        module = modules.get(name)
        weight = getattr(module, "weight", None)
        if weight is None or tuple(weight.shape) != tuple(delta.shape):
            shape = None if weight is None else tuple(weight.shape)
            raise ArtifactError(
                f"{folder}: adapter module {name!r} (delta {tuple(delta.shape)}) does not fit this base model "
                f"(weight {shape})"
            )
        plan.append((weight, delta))
    return plan


_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


def first_adapted_layer(keys) -> int:
    """The lowest decoder-layer index an adapter's tensors (peft key names) touch; 0 when a key is not inside a
    numbered decoder layer (e.g. an adapted embedding or head), so nothing before it can be shared."""
    indices = []
    for key in keys:
        match = _LAYER_INDEX.search(key)
        if match is None:
            return 0
        indices.append(int(match.group(1)))
    return min(indices, default=0)


def adapter_first_layer(folder: str | Path) -> int:
    """:func:`first_adapted_layer` of the adapter in ``folder`` (reads tensor names only)."""
    from safetensors import safe_open

    path = Path(folder) / ADAPTER_WEIGHTS
    if not path.is_file():
        return 0
    with safe_open(str(path), framework="pt") as handle:
        return first_adapted_layer(handle.keys())


class merged_into:  # noqa: N801 - used as a context manager, reads like ``with``
    """Merge an adapter into ``base_model``'s weights in place for the ``with`` block, then restore them.

    ``W <- W + scaling * B @ A`` for every adapted module (what ``merge_and_unload`` computes), and on exit
    every touched weight is copied back from a saved copy, so the base model is bit-identical afterwards and
    the next adapter can be evaluated without reloading it. Adapters peft merges differently (DoRA,
    fan_in_fan_out, other PEFT types) go through peft on a deep copy of the base model instead.
    ``folder=None`` yields the base model itself.
    """

    def __init__(
        self, base_model, folder: str | Path | None, base_model_id: str | Sequence[str] | None = None
    ) -> None:
        self.base, self.folder, self.base_model_id = base_model, folder, base_model_id
        self.saved: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __enter__(self):
        if self.folder is None:
            return self.base
        folder = Path(self.folder)
        state, config = read_adapter(folder)
        if self.base_model_id is not None:
            check_adapter_base(config, self.base_model_id, folder)
        plan = _merge_plan(self.base, folder, state, config)
        if plan is None:
            import copy

            return merge_adapter(copy.deepcopy(self.base), folder, self.base_model_id)
        _apply_plan(plan, self.saved)
        return self.base

    def __exit__(self, *exc) -> None:
        _restore(self.saved)


def _apply_plan(plan, saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for weight, delta in plan:
            saved.append((weight, weight.detach().clone()))
            weight.add_(delta.to(dtype=weight.dtype, device=weight.device))


def _restore(saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for weight, original in saved:
            weight.copy_(original)
    saved.clear()


class merged_state_into:  # noqa: N801 - a context manager, like merged_into
    """:class:`merged_into` for an adapter held in memory (a LoRA ``state`` in peft key names and its
    ``adapter_config``), e.g. one the generator just decoded. Plain LoRA only; ``where`` names it in errors."""

    def __init__(self, base_model, state: dict[str, torch.Tensor], config: dict[str, Any], where: str) -> None:
        self.base, self.state, self.config, self.where = base_model, state, config, where
        self.saved: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __enter__(self):
        plan = _merge_plan(self.base, Path(self.where), self.state, self.config)
        if plan is None:
            raise ArtifactError(f"{self.where}: only a plain LoRA adapter can be merged from memory")
        _apply_plan(plan, self.saved)
        return self.base

    def __exit__(self, *exc) -> None:
        _restore(self.saved)
