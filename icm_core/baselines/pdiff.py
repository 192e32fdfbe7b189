"""COND P-DIFF (Jin et al. 2024), the paper's strongest baseline: an autoencoder plus a conditional
latent DDPM over the same flattened LoRA weights, conditioned on the same task vectors.

Following the public code's design (see ``shared/notes/anchors.md``):

* **normalisation** (``PDiffConfig.normalization``): ``per_task`` (the public code) z-scores every
  coordinate across that task's checkpoints, and those statistics travel with the artifact: its
  ``norm.mean`` rows *are* each task's mean checkpoint, so de-normalising any decoder output near zero
  gives back that stored mean. ``shared`` is the variant without per-task statistics: one per-tensor
  z-score over all tasks' checkpoints, as the ICM-LoRA generator uses, so everything task-specific must
  come from the networks and the condition;
* **autoencoder**: 1-D convolutions that fold the sequence by ``fold_rate`` per layer (encoder channels
  ``[4, 4, 4, 4]``, decoder ``[4, 256, 256, 8]`` -> 1), InstanceNorm + LeakyReLU, a tanh latent, noise
  augmentation on the input (0.001) and on the latent (0.1, then clamped to [-1, 1]);
* **denoiser**: a 1-D U-Net (channels ``[64, 128, 256, 512]``) over the latent sequence; the condition
  is projected to a few extra positions and concatenated along the sequence axis; learned time
  embedding;
* **DDPM**: T = 1000, linear betas 1e-4 -> 2e-2, epsilon prediction with an MSE loss, ancestral sampling.

Generation: z_T ~ N(0, I) -> T denoising steps with the task's condition -> decode -> de-normalise
with that task's statistics -> LoRA state dict. Like the ICM-LoRA generator, the artifact is self-
contained: no real checkpoint is needed to generate.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from icm_core.baselines.config import PDiffConfig
from icm_core.baselines.pdiff_networks import ConditionalUNet1d, FoldingAutoencoder, NoiseSchedule
from icm_core.generator.config import SampleConfig
from icm_core.generator.dataset import GeneratorDataset
from icm_core.generator.generator import ConditionNorm
from icm_core.generator.task_vectors import check_task_vector
from icm_core.infra.faults import fault_point
from icm_core.infra.io import ArtifactError, load_tensors, save_tensors
from icm_core.infra.resume import (
    Resumer,
    load_module,
    restore_training_state,
    training_state,
)
from icm_core.lora.flatten import LoraLayout, NormStats, denormalize, fit_norm_stats, normalize, unflatten_lora


# --- schedule ---------------------------------------------------------------------------------------


# --- autoencoder ------------------------------------------------------------------------------------


# --- denoiser ---------------------------------------------------------------------------------------


# --- normalisation ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskNorm:
    """Per task, per coordinate mean/std over that task's checkpoints (COND P-DIFF's normalisation)."""

    names: tuple[str, ...]
    mean: Tensor  # [num_tasks, L]
    std: Tensor  # [num_tasks, L]

    @classmethod
    def fit(cls, weights: Tensor, owners: list[str], eps: float) -> TaskNorm:
        names = tuple(sorted(set(owners)))
        means, stds = [], []
        for name in names:
            rows = weights[[i for i, owner in enumerate(owners) if owner == name]].double()
            means.append(rows.mean(0))
            stds.append(rows.std(0, unbiased=False).clamp_min(eps))
        return cls(names, torch.stack(means).float(), torch.stack(stds).float())

    def index(self, name: str) -> int:
        if name not in self.names:
            raise KeyError(f"category {name!r} is not known to this COND P-DIFF model ({list(self.names)})")
        return self.names.index(name)

    def normalize(self, weights: Tensor, owners: list[str]) -> Tensor:
        idx = torch.tensor([self.index(o) for o in owners])
        return (weights - self.mean[idx]) / self.std[idx]

    def denormalize(self, flat: Tensor, name: str) -> Tensor:
        i = self.index(name)
        return flat * self.std[i] + self.mean[i]


@dataclass(frozen=True)
class SharedNorm:
    """One per-tensor z-score over the checkpoints of all tasks (no per-task statistics are stored)."""

    names: tuple[str, ...]
    stats: NormStats
    layout: LoraLayout

    @classmethod
    def fit(cls, weights: Tensor, owners: list[str], layout: LoraLayout, eps: float) -> SharedNorm:
        return cls(tuple(sorted(set(owners))), fit_norm_stats(weights, layout, eps=eps), layout)

    def index(self, name: str) -> int:
        if name not in self.names:
            raise KeyError(f"category {name!r} is not known to this COND P-DIFF model ({list(self.names)})")
        return self.names.index(name)

    def normalize(self, weights: Tensor, owners: list[str]) -> Tensor:
        for owner in set(owners):
            self.index(owner)
        return normalize(weights, self.stats, self.layout)

    def denormalize(self, flat: Tensor, name: str) -> Tensor:
        self.index(name)
        return denormalize(flat.unsqueeze(0), self.stats, self.layout)[0]


def fit_task_norm(weights: Tensor, owners: list[str], layout: LoraLayout, cfg: PDiffConfig) -> TaskNorm | SharedNorm:
    """The normalisation ``cfg.normalization`` asks for, fitted on the training checkpoints."""
    if cfg.normalization == "shared":
        return SharedNorm.fit(weights, owners, layout, cfg.norm_eps)
    return TaskNorm.fit(weights, owners, cfg.norm_eps)


# --- the model --------------------------------------------------------------------------------------


@dataclass
class PDiffModel:
    """Trained autoencoder + denoiser, with everything needed to emit a PEFT adapter."""

    autoencoder: FoldingAutoencoder
    denoiser: ConditionalUNet1d
    layout: LoraLayout
    norm: TaskNorm | SharedNorm
    cond_norm: ConditionNorm
    adapter_config: dict[str, Any]
    task_vectors: dict[str, Tensor]
    cfg: PDiffConfig
    meta: dict[str, Any] = field(default_factory=dict)

    @torch.no_grad()
    def sample_latents(self, task_vectors: Tensor, seeds: Sequence[int]) -> Tensor:
        """Ancestral DDPM sampling of one latent per row of ``task_vectors`` ``[B, C]``, all rows in one batch:
        z_T ~ N(0, I), then T steps of p(z_{t-1} | z_t, condition). Row ``i`` draws its noise from its own
        generator seeded ``seeds[i]``, so a row's latent does not depend on what else is in the batch (up to
        float rounding of the batched convolutions)."""
        if task_vectors.dim() != 2 or task_vectors.shape[0] != len(seeds):
            raise ValueError(
                f"task_vectors must be [B, C] with one seed per row, got {list(task_vectors.shape)} "
                f"and {len(seeds)} seeds"
            )
        cfg = self.cfg
        schedule = NoiseSchedule.linear(cfg.timesteps, cfg.beta_start, cfg.beta_end)
        variance = schedule.posterior_variance()
        rngs = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
        self.denoiser.eval()
        cond = torch.stack([self.cond_norm(check_task_vector(v, self.denoiser.cond_dim)) for v in task_vectors])

        def noise() -> Tensor:
            return torch.stack([torch.randn(self.denoiser.latent_shape, generator=rng) for rng in rngs])

        z = noise()
        for t in reversed(range(schedule.timesteps)):
            eps = self.denoiser(z, torch.full((len(rngs),), t), cond)
            beta, alpha, a_bar = (float(v[t]) for v in (schedule.betas, schedule.alphas, schedule.alpha_bars))
            z = (z - beta / math.sqrt(1 - a_bar) * eps) / math.sqrt(alpha)
            if t > 0:
                z = z + math.sqrt(float(variance[t])) * noise()
        return z.clamp(-1, 1)

    @torch.no_grad()
    def generate(self, categories: Sequence[str], cfg: SampleConfig | None = None) -> dict[str, dict[str, Tensor]]:
        """Sample a LoRA state dict for each training category (its task vector and its statistics). Every
        category's ``cfg.num_draws`` latents (seeds ``cfg.seed``, ``cfg.seed + 1``, ...) are denoised in one
        batch: the T denoising steps are paid once for all of them, not once per category and draw."""
        cfg = cfg or SampleConfig()
        unknown = [name for name in categories if name not in self.task_vectors]
        if unknown:
            raise KeyError(
                f"categories {unknown} are not known to this COND P-DIFF model ({sorted(self.task_vectors)})"
            )
        rows = [(name, cfg.seed + draw) for name in categories for draw in range(cfg.num_draws)]
        if not rows:
            return {}
        latents = self.sample_latents(
            torch.stack([self.task_vectors[name] for name, _ in rows]), [seed for _, seed in rows]
        )
        self.autoencoder.eval()
        flats = self.autoencoder.decode(latents).reshape(len(categories), cfg.num_draws, -1).mean(1)
        return {
            name: unflatten_lora(self.norm.denormalize(flat, name), self.layout)
            for name, flat in zip(categories, flats, strict=True)
        }

    def generate_for(self, category: str, cfg: SampleConfig | None = None) -> dict[str, Tensor]:
        """Sample a LoRA state dict for one training category (:meth:`generate` with one category)."""
        return self.generate([category], cfg)[category]


def train_pdiff(
    dataset: GeneratorDataset,
    cfg: PDiffConfig,
    adapter_config: dict[str, Any],
    device: str | torch.device = "cpu",
    on_progress: Callable[[str, int, float], None] | None = None,
    resume: Resumer | None = None,
) -> tuple[PDiffModel, dict[str, list[dict]], float]:
    """Train COND P-DIFF on all categories' checkpoints: autoencoder first, then the latent DDPM.

    Deterministic on CPU for equal inputs (seeded, with the caller's RNG state restored). With ``resume``,
    state is saved every ``resume.every["ae_epochs"]`` autoencoder epochs and ``resume.every["ddpm_steps"]``
    denoiser steps, and a saved state is continued from with a bit-identical result (``icm_core.infra.resume``).

    Returns:
        ``(model, history, seconds)``; history has ``"autoencoder"`` rows ``{epoch, recon}`` and
        ``"ddpm"`` rows ``{step, loss}`` (one row per ``log_every`` steps).
    """
    device = torch.device(device)
    started = time.perf_counter()
    history: dict[str, list[dict]] = {"autoencoder": [], "ddpm": []}
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(cfg.seed)
        order = torch.Generator().manual_seed(cfg.seed)
        # 1. Per-task, per-coordinate z-score (the official normalisation), fitted on each task's checkpoints,
        #    or one shared per-tensor z-score (normalization='shared').
        norm = fit_task_norm(dataset.weights, dataset.row_category, dataset.layout, cfg)
        x_all = norm.normalize(dataset.weights, dataset.row_category).to(device)
        cond_norm = ConditionNorm.fit(torch.stack([dataset.task_vectors[n] for n in sorted(dataset.task_vectors)]))
        c_all = cond_norm(dataset.conds).to(device)
        n = x_all.shape[0]

        # A saved state says where a killed run stopped: (phase, position). Global step: AE epochs, then
        # ae_epochs + DDPM steps, so states of both phases order correctly.
        saved = resume.load() if resume is not None else None
        phase = saved.meta["phase"] if saved is not None else "autoencoder"
        if saved is not None:
            history = saved.meta["history"]

        def save(global_step: int, label: str, nets: dict[str, nn.Module], opt, extra: dict[str, Any]) -> None:
            tensors, meta = training_state(nets, opt, {"order": order})
            resume.save(global_step, tensors, {**meta, "label": label, "history": history, **extra})

        # 2. Autoencoder: reconstruct clean weights from noise-augmented input and latent.
        autoencoder = FoldingAutoencoder(x_all.shape[1], cfg).to(device)
        opt = torch.optim.AdamW(autoencoder.parameters(), lr=cfg.ae_lr, weight_decay=cfg.weight_decay)
        first_epoch = 0
        if saved is not None:
            load_module(autoencoder, saved.tensors, "ae.")
            if phase == "autoencoder":
                restore_training_state(saved, {}, opt, {"order": order})
                first_epoch = saved.meta["position"]
        autoencoder.train()
        for epoch in range(first_epoch if phase == "autoencoder" else cfg.ae_epochs, cfg.ae_epochs):
            total = 0.0
            for idx in torch.randperm(n, generator=order).split(cfg.batch_size):
                x = x_all[idx.to(device)]
                loss = F.mse_loss(autoencoder(x), x)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * idx.numel()
            history["autoencoder"].append({"epoch": epoch, "recon": total / n})
            if not math.isfinite(total):
                raise FloatingPointError(f"COND P-DIFF autoencoder diverged at epoch {epoch}")
            if resume is not None and resume.due("ae_epochs", epoch + 1, cfg.ae_epochs):
                save(
                    epoch + 1,
                    f"autoencoder epoch {epoch + 1}",
                    {"ae": autoencoder},
                    opt,
                    {"phase": "autoencoder", "position": epoch + 1},
                )
            fault_point("pdiff.step")
            if on_progress is not None:
                on_progress("autoencoder", epoch, total / n)

        # 3. Latents of every checkpoint (no augmentation): the DDPM's training data.
        autoencoder.eval()
        with torch.no_grad():
            latents = autoencoder.encode(x_all)

        # 4. Latent DDPM: predict the noise added at a uniformly drawn step, conditioned on the task.
        schedule = NoiseSchedule.linear(cfg.timesteps, cfg.beta_start, cfg.beta_end)
        denoiser = ConditionalUNet1d(autoencoder.latent_shape, c_all.shape[1], cfg).to(device)
        opt = torch.optim.AdamW(denoiser.parameters(), lr=cfg.ddpm_lr, weight_decay=cfg.weight_decay)
        running, first_step = 0.0, 1
        if saved is not None and phase == "ddpm":
            restore_training_state(saved, {"unet": denoiser}, opt, {"order": order})
            running, first_step = saved.meta["running"], saved.meta["position"] + 1
        denoiser.train()
        for step in range(first_step, cfg.ddpm_steps + 1):
            idx = torch.randint(0, n, (min(cfg.batch_size, n),), generator=order).to(device)
            z0, c = latents[idx], c_all[idx]
            t = torch.randint(0, schedule.timesteps, (idx.numel(),), generator=order).to(device)
            noise = torch.randn_like(z0)
            loss = F.mse_loss(denoiser(schedule.add_noise(z0, noise, t), t, c), noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running += loss.item()
            if step % cfg.log_every == 0 or step == cfg.ddpm_steps:
                count = step % cfg.log_every or cfg.log_every
                history["ddpm"].append({"step": step, "loss": running / count})
                if not math.isfinite(running):
                    raise FloatingPointError(f"COND P-DIFF DDPM diverged at step {step}")
                if on_progress is not None:
                    on_progress("ddpm", step, running / count)
                running = 0.0
            if resume is not None and resume.due("ddpm_steps", step, cfg.ddpm_steps):
                save(
                    cfg.ae_epochs + step,
                    f"ddpm step {step}",
                    {"ae": autoencoder, "unet": denoiser},
                    opt,
                    {"phase": "ddpm", "position": step, "running": running},
                )
            fault_point("pdiff.step")
        denoiser.eval()
    model = PDiffModel(
        autoencoder.cpu(),
        denoiser.cpu(),
        dataset.layout,
        norm,
        cond_norm,
        adapter_config,
        dict(dataset.task_vectors),
        cfg,
        {"num_checkpoints": n, "categories": sorted(dataset.task_vectors)},
    )
    return model, history, time.perf_counter() - started


def save_pdiff(path: str | Path, model: PDiffModel, extra_meta: dict[str, Any] | None = None) -> str:
    """One safetensors file + sidecar holding both networks, per-task statistics and task vectors."""
    tensors = {f"ae.{k}": v for k, v in model.autoencoder.state_dict().items()}
    tensors |= {f"unet.{k}": v for k, v in model.denoiser.state_dict().items()}
    if isinstance(model.norm, SharedNorm):
        tensors |= {"norm.mean": model.norm.stats.mean, "norm.std": model.norm.stats.std}
    else:
        tensors |= {"norm.mean": model.norm.mean, "norm.std": model.norm.std}
    tensors["cond.mean"] = model.cond_norm.mean
    tensors |= {f"task_vector.{name}": v for name, v in model.task_vectors.items()}
    meta = {
        "kind": "cond-pdiff-generator",
        "pdiff_config": model.cfg.model_dump(mode="json"),
        "input_len": model.autoencoder.input_len,
        "cond_dim": model.denoiser.cond_dim,
        "cond_scale": model.cond_norm.scale,
        "norm_names": list(model.norm.names),
        "layout": model.layout.to_json(),
        "adapter_config": model.adapter_config,
        **model.meta,
        **(extra_meta or {}),
    }
    return save_tensors(path, tensors, meta)


def load_pdiff(path: str | Path) -> PDiffModel:
    """Load a COND P-DIFF artifact (sha256-verified)."""
    tensors, meta = load_tensors(path)
    if meta.get("kind") != "cond-pdiff-generator":
        raise ArtifactError(f"{path}: not a COND P-DIFF artifact (sidecar kind {meta.get('kind')!r})")
    cfg = PDiffConfig.model_validate(meta["pdiff_config"])
    autoencoder = FoldingAutoencoder(int(meta["input_len"]), cfg)
    autoencoder.load_state_dict({k[3:]: v for k, v in tensors.items() if k.startswith("ae.")})
    denoiser = ConditionalUNet1d(autoencoder.latent_shape, int(meta["cond_dim"]), cfg)
    denoiser.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("unet.")})
    layout = LoraLayout.from_json(meta["layout"])
    names = tuple(meta["norm_names"])
    if cfg.normalization == "shared":
        norm: TaskNorm | SharedNorm = SharedNorm(names, NormStats(tensors["norm.mean"], tensors["norm.std"]), layout)
    else:
        norm = TaskNorm(names, tensors["norm.mean"], tensors["norm.std"])
    return PDiffModel(
        autoencoder.eval(),
        denoiser.eval(),
        layout,
        norm,
        ConditionNorm(tensors["cond.mean"], float(meta["cond_scale"])),
        meta["adapter_config"],
        {k.removeprefix("task_vector."): v for k, v in tensors.items() if k.startswith("task_vector.")},
        cfg,
        meta,
    )
