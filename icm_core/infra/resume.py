"""Resumable training state inside long stages: a killed fine-tune or generator training continues from its
last saved step and ends bit-identical to an uninterrupted run.

A training loop that is given a :class:`Resumer` saves, every ``every[loop]`` steps (or epochs), everything
that decides what happens next:

- the weights that change (trainable parameters, and buffers such as BatchNorm statistics),
- the optimizer state (AdamW moments and step counts) and the learning-rate scheduler,
- every random stream (torch's global generator, CUDA's, and the loop's own ``torch.Generator`` s),
- the loop position and what it has produced so far (loss history, checkpoint files already written).

The state is a safetensors file plus JSON sidecar, ``state-<step:09d>.safetensors`` in the resumer's folder
(the stage's staging folder; the Prefect task puts it next to the output folder, never inside it, and
removes it once the output's manifest is written). A new state is complete when its sidecar is written;
older states are deleted after that, so a kill while saving leaves the previous state usable. On start the
loop loads the newest state whose sha256 verifies and continues from it; a damaged or missing state means
starting from step 0. Iterators that produce batches from their own seeded generator are replayed up to
the saved step (drawing indices only, no compute), which reproduces their position exactly.

Saving reads tensors but draws no random numbers, so a run that saves state is bit-identical to one that
does not. The ``every`` values are therefore not part of any output's cache key.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from icm_core.infra.io import ArtifactError, load_tensors, read_json, save_tensors, sidecar_path


logger = logging.getLogger("icm_lora.resume")

STATE_GLOB = "state-*.safetensors"


@dataclass(frozen=True)
class SavedState:
    """One loaded resumable state."""

    step: int
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]

    @property
    def label(self) -> str:
        return self.meta.get("label", f"step {self.step}")


@dataclass(frozen=True)
class Resumer:
    """Where a training loop keeps its resumable state, and how often it saves (per loop name; 0 = never).

    Attributes:
        folder: The state folder (created on the first save).
        every: ``{loop name: interval}``, e.g. ``{"steps": 25}`` for LoRA, ``{"epochs": 20}`` for the CVAE,
            ``{"ae_epochs": 20, "ddpm_steps": 250}`` for COND P-DIFF.
    """

    folder: Path
    every: Mapping[str, int] = field(default_factory=dict)

    def due(self, loop: str, done: int, last: int) -> bool:
        """Whether to save after ``done`` of ``last`` steps of ``loop`` (never after the last: the output follows)."""
        interval = int(self.every.get(loop, 0) or 0)
        return interval > 0 and done % interval == 0 and done < last

    def states(self) -> list[Path]:
        """State files, newest first."""
        if not self.folder.is_dir():
            return []
        return sorted(self.folder.glob(STATE_GLOB), reverse=True)

    def latest_label(self) -> str | None:
        """What the newest saved state says it is ("step 25", "epoch 40", ...), read without verifying it."""
        for path in self.states():
            try:
                meta = read_json(sidecar_path(path)).get("meta", {})
            except ArtifactError:
                continue
            return meta.get("label", f"step {meta.get('step')}")
        return None

    def load(self) -> SavedState | None:
        """The newest state that verifies, or None (start from step 0)."""
        for path in self.states():
            if not sidecar_path(path).is_file():
                continue
            try:
                tensors, meta = load_tensors(path)
            except ArtifactError as exc:
                logger.warning("ignoring damaged resumable state: %s", exc)
                continue
            state = SavedState(int(meta["step"]), tensors, meta)
            logger.info("resuming from %s (%s)", state.label, path)
            return state
        return None

    def save(
        self, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any], files: Iterable[Path] = ()
    ) -> Path:
        """Write the state for ``step`` (plus copies of ``files`` the loop has already written), then delete
        older states. ``meta`` must be JSON-ready; ``step`` orders states, so it must grow."""
        self.folder.mkdir(parents=True, exist_ok=True)
        copies = self.folder / "files"
        for path in files:
            if path.is_file() and not (copies / path.name).is_file():
                copies.mkdir(exist_ok=True)
                shutil.copy2(path, copies / path.name)
        target = self.folder / f"state-{step:09d}.safetensors"
        save_tensors(target, tensors, {**meta, "step": step})
        for old in self.states():
            if old != target:
                old.unlink(missing_ok=True)
                sidecar_path(old).unlink(missing_ok=True)
        return target

    def restore_files(self, names: Iterable[str], out_dir: Path) -> None:
        """Copy the files saved with the state back into the (freshly reset) output folder."""
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in names:
            source = self.folder / "files" / name
            if not source.is_file():
                raise ArtifactError(f"{source}: listed in the resumable state but missing")
            shutil.copy2(source, out_dir / name)

    def clear(self) -> None:
        """Remove the state (the output is complete)."""
        shutil.rmtree(self.folder, ignore_errors=True)


# --- what goes into a state ------------------------------------------------------------------------


def module_tensors(module: torch.nn.Module, prefix: str, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The parameters (all, or only the trainable ones) and buffers of ``module``, keyed ``prefix + name``."""
    out = {
        prefix + name: p.detach().clone()
        for name, p in module.named_parameters()
        if p.requires_grad or not trainable_only
    }
    out |= {prefix + name: b.detach().clone() for name, b in module.named_buffers() if b is not None}
    return out


@torch.no_grad()
def load_module(module: torch.nn.Module, tensors: Mapping[str, torch.Tensor], prefix: str) -> None:
    """Copy saved parameters and buffers back into ``module`` (in place, so optimizers keep their references)."""
    named = dict(module.named_parameters()) | {n: b for n, b in module.named_buffers() if b is not None}
    for key, value in tensors.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        if name not in named:
            raise ArtifactError(f"resumable state: {name!r} is not a parameter or buffer of the model")
        named[name].copy_(value.to(named[name].device))


def optimizer_state(optimizer: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer's ``state_dict`` as tensors (``prefix<param>.<key>``) and JSON (param groups, scalars)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, slots in state["state"].items():
        for key, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}{index}.{key}"] = value.detach().clone()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], prefix: str
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix):
            index, slot = key[len(prefix) :].split(".", 1)
            state.setdefault(int(index), {})[slot] = value
    for key, value in meta["scalars"].items():
        index, slot = key.split(".", 1)
        state.setdefault(int(index), {})[slot] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in group.items()} for group in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_state(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, torch.Tensor]:
    """torch's global RNG state, every CUDA device's, and the named generators'."""
    out = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, value in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{index}"] = value
    for name, generator in (generators or {}).items():
        out[f"rng.gen.{name}"] = generator.get_state()
    return out


def load_rng_state(
    tensors: Mapping[str, torch.Tensor], generators: Mapping[str, torch.Generator] | None = None
) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    for name, generator in (generators or {}).items():
        generator.set_state(tensors[f"rng.gen.{name}"])


def training_state(
    modules: Mapping[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    generators: Mapping[str, torch.Generator] | None = None,
    trainable_only: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """What a training loop saves to continue bit-identically: each module's weights (tensor keys ``<name>.``;
    only the trainable ones with ``trainable_only``), the optimizer (``optimizer.``) and every random stream (torch's,
    CUDA's and the loop's own ``generators``). Returns the tensors and the meta :func:`restore_training_state`
    reads back; the loop adds its own position and history to the meta."""
    tensors = rng_state(generators)
    for name, module in modules.items():
        tensors |= module_tensors(module, f"{name}.", trainable_only)
    opt_tensors, opt_meta = optimizer_state(optimizer, "optimizer.")
    return tensors | opt_tensors, {"optimizer": opt_meta}


def restore_training_state(
    saved: SavedState,
    modules: Mapping[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    generators: Mapping[str, torch.Generator] | None = None,
) -> None:
    """Load what :func:`training_state` saved into the loop's modules, optimizer and random streams."""
    for name, module in modules.items():
        load_module(module, saved.tensors, f"{name}.")
    load_optimizer_state(optimizer, saved.tensors, saved.meta["optimizer"], "optimizer.")
    load_rng_state(saved.tensors, generators)
