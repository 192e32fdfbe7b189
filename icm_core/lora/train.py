"""Fine-tune one LoRA adapter per task category and keep its trajectory (the generator's data).

A trajectory folder holds ``checkpoint-<step>.safetensors`` files, each with a JSON sidecar, a
``trajectory.json`` index listing them in step order (numbers, never sorted as strings), and
``adapter/``: the final checkpoint as a standard PEFT adapter folder (the "original LoRA").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from icm_core.infra.faults import fault_point
from icm_core.infra.io import (
    save_tensors,
    sidecar_path,
    write_json,
)
from icm_core.infra.resume import (
    Resumer,
    restore_training_state,
    training_state,
)
from icm_core.lora.adapters import (
    adapter_config_dict,
    first_adapted_layer,
    lora_config_for,
    lora_state_dict,
    write_adapter,
)
from icm_core.lora.config import LoraTrainConfig
from icm_core.lora.trajectory import TRAJECTORY_INDEX, Trajectory
from icm_core.models.prefix import block_states, decoder_stack, layers_from


def checkpoint_steps(cfg: LoraTrainConfig) -> list[int]:
    """Steps whose weights are saved: the last ``trajectory_size`` multiples of ``checkpoint_every``
    counted back from the final step (so the final adapter is always the last checkpoint)."""
    return [cfg.steps - i * cfg.checkpoint_every for i in reversed(range(cfg.trajectory_size))]


def lr_at(step: int, cfg: LoraTrainConfig) -> float:
    """Linear warmup, then cosine decay from ``lr`` to ``lr * final_lr_ratio`` at the last step.

    The decay makes the last checkpoints (the trajectory) samples around the solution training ends
    at, as the paper's "last epochs" of a converged run are, rather than points along a steep descent:
    their mean is then as good as the final adapter.
    """
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - 1 - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.final_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def train_lora(
    base_model: torch.nn.Module,
    train_blocks: torch.Tensor,
    cfg: LoraTrainConfig,
    out_dir: str | Path,
    base_model_id: str,
    on_step: Callable[[int, float], None] | None = None,
    resume: Resumer | None = None,
    reuse_prefix: bool = True,
) -> Trajectory:
    """Fine-tune a LoRA adapter on ``train_blocks`` [N, T] and save its trajectory to ``out_dir``.

    ``base_model`` is wrapped in place by peft; pass a freshly loaded model. With ``resume``, training
    state is saved every ``resume.every["steps"]`` steps and a saved state is continued from.

    When the run sees its blocks more than once (``steps * batch_size > N``) and the adapters sit above layer 0,
    the frozen layers below the lowest adapted one run once per block (``icm_core.models.prefix``) and every step
    runs only the layers from there up; the same arithmetic to float rounding. ``reuse_prefix=False`` always runs
    the whole model.
    """
    from peft import get_peft_model

    out_dir = Path(out_dir)
    device = next(base_model.parameters()).device
    if train_blocks.dim() != 2 or train_blocks.shape[0] == 0:
        raise ValueError(f"train_blocks must be a non-empty [N, T] tensor, got {tuple(train_blocks.shape)}")

    # 1) Seed before wrapping: LoRA A matrices are initialised from this seed, so categories trained
    #    with the same seed start from the same point and differ only by what their data taught them.
    torch.manual_seed(cfg.seed)
    model = get_peft_model(base_model, lora_config_for(base_model, cfg, base_model_id))
    model.train()
    batch_order = torch.Generator().manual_seed(cfg.seed)

    # 2) Blocks seen more than once: the layers below the lowest adapted one (frozen, no dropout) give the same
    #    states every time, so they run once per block, here, and each step starts at that layer.
    start = first_adapted_layer(lora_state_dict(model).keys())
    states = None
    repeats = cfg.steps * cfg.batch_size > train_blocks.shape[0]
    if reuse_prefix and repeats and start > 0 and decoder_stack(model) is not None:
        states = block_states(model, train_blocks, start, cfg.batch_size)

    # 3) Batches are drawn by epochs over a seeded permutation, so a run is reproducible.
    def batches():
        while True:
            for idx in torch.randperm(train_blocks.shape[0], generator=batch_order).split(cfg.batch_size):
                yield idx, train_blocks[idx].to(device)

    def causal_lm_loss(model: torch.nn.Module, item: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        idx, batch = item
        if states is None:
            return model(input_ids=batch, labels=batch).loss
        with layers_from(model, start):
            return model(inputs_embeds=states[idx], labels=batch, use_cache=False).loss

    # 4) and 5): the shared loop; the final checkpoint doubles as the category's "original LoRA".
    return fit_lora_trajectory(model, batches(), causal_lm_loss, cfg, out_dir, base_model_id, on_step, resume)


def fit_lora_trajectory(
    model: torch.nn.Module,
    batches: Iterator[Any],
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
    cfg: LoraTrainConfig | Any,
    out_dir: str | Path,
    base_model_id: str,
    on_step: Callable[[int, float], None] | None = None,
    resume: Resumer | None = None,
) -> Trajectory:
    """Train a peft-wrapped ``model`` for ``cfg.steps`` steps of ``loss_fn(model, next(batches))`` and save
    its trajectory: the last ``cfg.trajectory_size`` checkpoints, the final adapter in PEFT form and the
    index. Shared by language and detector LoRA (``cfg`` needs the fields of ``LoraTrainConfig`` used by
    ``lr_at`` and ``checkpoint_steps``, plus ``weight_decay``).

    AdamW on the trainable parameters, the warmup-cosine schedule of ``lr_at``, gradient norm clipped at 1.0;
    a non-finite loss stops training with ``FloatingPointError`` naming the step.

    With ``resume`` (``icm_core.infra.resume``), the LoRA weights, AdamW state, random streams, losses and the
    checkpoints written so far are saved every ``resume.every["steps"]`` steps; a saved state is continued
    from, after replaying ``batches`` to its position (``batches`` must be deterministic given its seed),
    and the run ends bit-identical to an uninterrupted one.
    """
    out_dir = Path(out_dir)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    save_at = set(checkpoint_steps(cfg))
    steps, files, hashes, losses = [], [], [], []
    start = 0
    saved = resume.load() if resume is not None else None
    if saved is not None:
        # Continue a killed run: same batch position, weights, optimizer moments, random streams and history.
        start = saved.step
        for _ in range(start):
            next(batches)
        restore_training_state(saved, {"model": model}, optimizer)
        steps, files, hashes = saved.meta["steps"], saved.meta["files"], saved.meta["sha256"]
        losses = saved.meta["losses"]
        resume.restore_files([n for f in files for n in (f, sidecar_path(f).name)], out_dir)
    for step in range(start + 1, cfg.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step - 1, cfg)
        loss = loss_fn(model, next(batches))
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"LoRA training diverged at step {step} (loss {loss.item()}); lower lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(loss.item())
        fault_point("lora.step", out_dir)
        if on_step is not None:
            on_step(step, loss.item())
        # Keep the last checkpoints: they are the generator's training data.
        if step in save_at:
            name = f"checkpoint-{step:06d}.safetensors"
            digest = save_tensors(out_dir / name, lora_state_dict(model), {"step": step, "loss": loss.item()})
            steps.append(step)
            files.append(name)
            hashes.append(digest)
        if resume is not None and resume.due("steps", step, cfg.steps):
            tensors, meta = training_state({"model": model}, optimizer, trainable_only=True)
            resume.save(
                step,
                tensors,
                {
                    **meta,
                    "label": f"step {step}",
                    "losses": losses,
                    "steps": steps,
                    "files": files,
                    "sha256": hashes,
                },
                files=[out_dir / n for f in files for n in (f, sidecar_path(f).name)],
            )

    model.eval()
    adapter_config = adapter_config_dict(model, base_model_id)
    write_adapter(out_dir / "adapter", lora_state_dict(model), adapter_config)
    index = {
        "steps": steps,
        "files": files,
        "sha256": hashes,
        "adapter_config": adapter_config,
        "losses": losses,
        "config": cfg.model_dump(mode="json"),
    }
    write_json(out_dir / TRAJECTORY_INDEX, index)
    return Trajectory(out_dir, steps, files, hashes, adapter_config, losses)
