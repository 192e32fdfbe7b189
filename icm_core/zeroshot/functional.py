"""A generator variant aimed at unseen categories: fine-tune the CVAE decoder through the frozen base model.

The paper's CVAE is trained to reconstruct LoRA weights; nothing tells it which directions of weight space
matter to the language model. Here the decoder is further trained on the **functional loss**: decode an
adapter from ``z ~ N(0, I)`` and a category's task vector, apply it to the frozen base model
(``W + scaling * B @ A`` through ``torch.func.functional_call``, no peft wrapper, no copy of the model) and
take the language model's NLL on that category's training text. The gradient flows through the frozen model
into the decoder only. A reconstruction term on the category's real checkpoints keeps the decoder anchored.
(Text-to-LoRA reports that its variant trained through the LM's loss generalised better than the one trained
by reconstruction; this is the same idea applied to ICM-LoRA's CVAE.) Nothing here imports Prefect.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call

from icm_core.generator.dataset import GeneratorDataset
from icm_core.generator.generator import Generator
from icm_core.lora.arithmetic import lora_modules, lora_scaling
from icm_core.lora.flatten import denormalize, normalize, unflatten_lora


__all__ = ["DECODER_PREFIXES", "FunctionalConfig", "base_weight_name", "functional_finetune", "functional_lm_loss"]


@dataclass(frozen=True)
class FunctionalConfig:
    """Settings of the functional fine-tune of the decoder.

    Attributes:
        steps: Optimizer steps (one category per step, cycling in a seeded order).
        lr: AdamW learning rate of the decoder.
        batch_blocks: Training blocks of the category per step.
        recon_weight: Weight of the reconstruction anchor (MSE of the decoded adapter to the category's checkpoints,
            in normalised units).
        seed: Seed of category order, latent draws and block choice.
    """

    steps: int = 100
    lr: float = 1e-4
    batch_blocks: int = 2
    recon_weight: float = 1.0
    seed: int = 0


DECODER_PREFIXES = ("decoder_input.", "decoder.", "final_layer.")
"""The CVAE parameters that generation uses (the encoder is only needed for training by reconstruction)."""


def base_weight_name(module: str) -> str:
    """The base model's weight for a peft module path (``base_model.model.<path>`` -> ``<path>.weight``)."""
    return module.removeprefix("base_model.model.") + ".weight"


def functional_lm_loss(
    base_model: torch.nn.Module,
    lora: Mapping[str, torch.Tensor],
    adapter_config: Mapping,
    input_ids: torch.Tensor,
) -> torch.Tensor:
    """Next-token NLL of ``base_model`` with the LoRA ``lora`` (peft key names, possibly requiring grad) added to
    its weights functionally; differentiable in ``lora``, the base model's own weights are untouched."""
    scaling = lora_scaling(adapter_config)
    params = dict(base_model.named_parameters())
    overrides: dict[str, torch.Tensor] = {}
    for module in lora_modules(lora):
        a = next(v for k, v in lora.items() if k.startswith(module + ".lora_A"))
        b = next(v for k, v in lora.items() if k.startswith(module + ".lora_B"))
        name = base_weight_name(module)
        if name not in params:
            raise KeyError(f"LoRA module {module!r}: the base model has no parameter {name!r}")
        overrides[name] = params[name].detach() + scaling * (b @ a)
    logits = functional_call(base_model, overrides, args=(), kwargs={"input_ids": input_ids}).logits[:, :-1].float()
    return F.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:])


def _decode_lora(generator: Generator, z: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, dict]:
    flat_norm = generator.model.decode(z, cond)[0]
    flat = denormalize(flat_norm.unsqueeze(0), generator.norm, generator.layout)[0]
    return flat_norm, unflatten_lora(flat, generator.layout)


def functional_finetune(
    generator: Generator,
    dataset: GeneratorDataset,
    base_model: torch.nn.Module,
    blocks: Mapping[str, torch.Tensor],
    cfg: FunctionalConfig,
    on_step: Callable[[int, dict], None] | None = None,
) -> list[dict]:
    """Fine-tune ``generator``'s decoder in place on the functional loss (plus a reconstruction anchor).

    Args:
        generator: A trained generator (its CVAE is updated in place; encoder and normalisers are kept).
        dataset: The generator's training data (checkpoints and task vectors of the training categories).
        base_model: The frozen base model (its parameters get ``requires_grad=False``).
        blocks: ``{category: [N, T] training token blocks}`` for the training categories only.
        cfg: Steps, learning rate, batch and anchor weight.
        on_step: Called with ``(step, row)`` after every step.

    Returns:
        One row per step: ``{"step", "category", "lm", "recon", "loss"}``.
    """
    names = sorted(blocks)
    missing = sorted(set(names) - set(dataset.task_vectors))
    if missing:
        raise ValueError(f"functional loss: no task vector for categories {missing}")
    for p in base_model.parameters():
        p.requires_grad_(False)
    base_model.eval()
    model = generator.model
    model.eval()  # BatchNorm keeps its running statistics: one decoded adapter per step
    decoder_params = [p for n, p in model.named_parameters() if n.startswith(DECODER_PREFIXES)]
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith(DECODER_PREFIXES))
    optimizer = torch.optim.AdamW(decoder_params, lr=cfg.lr)
    rng = random.Random(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    targets = normalize(dataset.weights, generator.norm, generator.layout)
    rows_of = {name: [i for i, owner in enumerate(dataset.row_category) if owner == name] for name in names}
    history = []
    order: list[str] = []
    for step in range(1, cfg.steps + 1):
        if not order:
            order = names[:]
            rng.shuffle(order)
        name = order.pop()
        cond = generator.cond_norm(dataset.task_vectors[name].float()).unsqueeze(0)
        z = torch.randn(1, model.latent_dim, generator=gen)
        flat_norm, lora = _decode_lora(generator, z, cond)
        pick = torch.randint(0, blocks[name].shape[0], (min(cfg.batch_blocks, blocks[name].shape[0]),), generator=gen)
        lm = functional_lm_loss(base_model, lora, generator.adapter_config, blocks[name][pick])
        recon = F.mse_loss(flat_norm, targets[rows_of[name]].mean(0))
        loss = lm + cfg.recon_weight * recon
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decoder_params, 1.0)
        optimizer.step()
        row = {"step": step, "category": name, "lm": lm.item(), "recon": recon.item(), "loss": loss.item()}
        history.append(row)
        if on_step is not None:
            on_step(step, row)
    for p in model.parameters():
        p.requires_grad_(True)
    return history
