"""Training the CVAE generator: the epoch loop with validation-based early stopping and resumable state."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from icm_core.generator.config import CVAEConfig
from icm_core.generator.cvae import GRAD_CLIP_NORM, RECALIBRATION_MIN_BATCHES, ConditionalVAE, cvae_loss
from icm_core.generator.dataset import GeneratorDataset
from icm_core.generator.generator import VALIDATION_Z_SEED, ConditionNorm, Generator
from icm_core.infra.faults import fault_point
from icm_core.infra.resume import (
    Resumer,
    restore_training_state,
    training_state,
)
from icm_core.lora.flatten import NormStats, denormalize, fit_norm_stats, normalize, unflatten_lora


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[Tensor]:
    """Shuffled index batches covering all ``n`` samples; a trailing one-sample batch joins the previous one.

    BatchNorm in training mode fails when it sees a single value per channel (one sample whose last
    feature map has length 1) and is needlessly noisy with one sample, so no batch of size 1 is made
    unless the whole data set is one sample.
    """
    order = torch.randperm(n, generator=generator)
    parts = list(order.split(batch_size))
    if len(parts) > 1 and parts[-1].numel() == 1:
        parts[-2] = torch.cat([parts[-2], parts[-1]])
        parts.pop()
    return parts


def train_cvae(
    weights: Tensor,
    conds: Tensor,
    cfg: CVAEConfig,
    device: str | torch.device = "cpu",
    on_epoch: Callable[[int, dict], None] | None = None,
    resume: Resumer | None = None,
    validate: Callable[[ConditionalVAE], float] | None = None,
) -> tuple[ConditionalVAE, list[dict]]:
    """Train one conditional VAE on all checkpoints of all tasks.

    Deterministic on CPU: the same inputs and config give bit-identical weights. The caller's global
    RNG state is saved and restored, so training does not disturb other random streams.

    Args:
        weights: ``[N, L]`` normalised, flattened LoRA checkpoints.
        conds: ``[N, C]`` the task vector of each checkpoint's task.
        cfg: Architecture and training settings.
        device: Where to train.
        on_epoch: Called after each epoch with ``(epoch, row)``; ``row`` is the history row below.
        resume: Where to save resumable state (weights, BatchNorm statistics, AdamW, scheduler, random streams,
            history) every ``resume.every["epochs"]`` epochs; a saved state is continued from, and the result
            is bit-identical to an uninterrupted run (``icm_core.infra.resume``).
        validate: Scores the model (in eval mode; lower is better) every ``cfg.val_every`` epochs. Training
            stops after ``cfg.patience`` checks without an improvement of ``cfg.min_delta`` and the
            best-scoring weights are kept (:class:`EarlyStopping`); ``cfg.epochs`` is the ceiling. It must not
            draw from torch's global random stream (training stays deterministic).

    Returns:
        ``(model, history)``: the trained model in eval mode, and one row per epoch
        ``{"epoch", "loss", "recon", "kld", "lr"}`` (losses averaged over the epoch's samples, ``lr`` the
        learning rate of the epoch's last step), plus ``"val"`` on the epochs that were validated and
        ``"best": True`` on the one whose weights were kept.

    Raises:
        ValueError: On mismatched or empty inputs, or a single sample that BatchNorm cannot train on.
    """
    if weights.dim() != 2 or conds.dim() != 2:
        raise ValueError(f"weights and conds must be 2-D, got {list(weights.shape)} and {list(conds.shape)}")
    if weights.shape[0] != conds.shape[0]:
        raise ValueError(f"weights has {weights.shape[0]} rows but conds has {conds.shape[0]}")
    n, length = weights.shape
    if n == 0:
        raise ValueError("no training samples")
    device = torch.device(device)
    cuda_devices: list[int] = []
    if device.type == "cuda":
        cuda_devices = [device.index if device.index is not None else torch.cuda.current_device()]

    # 1. Scope the seeding: fork the RNG so the caller's global stream is restored afterwards, then seed
    #    it (initialisation, reparameterisation noise, input noise) and a separate generator for the
    #    batch order, so the shuffle does not depend on how many random numbers the model drew.
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(cfg.seed)
        shuffle_gen = torch.Generator().manual_seed(cfg.seed)

        # 2. Build the model; float32 on the target device (weights may arrive as float64 / bfloat16).
        model = ConditionalVAE(length, conds.shape[1], cfg).to(device)
        x_all = weights.detach().to(device=device, dtype=torch.float32)
        c_all = conds.detach().to(device=device, dtype=torch.float32)
        if n == 1 and model.last_len == 1:
            # 3. BatchNorm needs more than one value per channel in training mode.
            raise ValueError(
                "a single sample with a last feature map of length 1 cannot be trained with BatchNorm; "
                "use more samples or fewer layers"
            )

        # 4. AdamW with cosine annealing to lr_min over every optimizer step of the run.
        steps_per_epoch = len(_batches(n, cfg.batch_size, torch.Generator().manual_seed(0)))
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=cfg.epochs * steps_per_epoch, eta_min=cfg.lr_min
        )

        history: list[dict] = []
        start = 0
        stopper = EarlyStopping(cfg.val_every, cfg.patience, cfg.min_delta) if validate is not None else None
        saved = resume.load() if resume is not None else None
        if saved is not None:
            # Continue a killed run from the end of its last saved epoch.
            restore_training_state(saved, {"model": model}, optimizer, {"shuffle": shuffle_gen})
            scheduler.load_state_dict(saved.meta["scheduler"])
            history, start = saved.meta["history"], saved.step
            if stopper is not None:
                stopper.load(saved.tensors, saved.meta.get("early_stopping"))
        model.train()
        for epoch in range(start, cfg.epochs):
            if stopper is not None and stopper.stopped:
                break
            sums = {"loss": 0.0, "recon": 0.0, "kld": 0.0}
            last_lr = optimizer.param_groups[0]["lr"]
            # 5. A fresh shuffle each epoch; every sample is used exactly once (nothing dropped).
            for idx in _batches(n, cfg.batch_size, shuffle_gen):
                idx = idx.to(device)
                x, c = x_all[idx], c_all[idx]
                # 6. Optional Gaussian input noise: augmentation that smooths the decoder around each checkpoint.
                x_in = x + cfg.input_noise * torch.randn_like(x) if cfg.input_noise > 0 else x
                x_hat, mu, logvar = model(x_in, c)
                # 7. Reconstruct the clean target, not the noisy input.
                loss, recon, kld = cvae_loss(x_hat, x, mu, logvar, cfg.kld_weight)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                # 8. Clip the global grad norm: the large KL term early in training can spike gradients.
                nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP_NORM)
                last_lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                b = idx.numel()
                sums["loss"] += loss.item() * b
                sums["recon"] += recon.item() * b
                sums["kld"] += kld.item() * b
            # 9. Per-epoch averages weighted by batch size, so a merged larger batch counts fully.
            row = {"epoch": epoch, **{key: value / n for key, value in sums.items()}, "lr": last_lr}
            if not all(math.isfinite(row[key]) for key in ("loss", "recon", "kld")):
                raise FloatingPointError(f"CVAE training diverged at epoch {epoch}: {row}")
            # 10. Validation: score the generation path (eval mode) and remember the best weights.
            if stopper is not None and stopper.due(epoch + 1, cfg.epochs):
                model.eval()
                row["val"] = float(validate(model))
                model.train()
                stopper.observe(epoch, row["val"], model)
            history.append(row)
            if resume is not None and resume.due("epochs", epoch + 1, cfg.epochs):
                tensors, meta = training_state({"model": model}, optimizer, {"shuffle": shuffle_gen})
                stop_tensors, stop_meta = stopper.state() if stopper is not None else ({}, None)
                resume.save(
                    epoch + 1,
                    {**tensors, **stop_tensors},
                    {
                        **meta,
                        "label": f"epoch {epoch + 1}",
                        "scheduler": scheduler.state_dict(),
                        "history": history,
                        "early_stopping": stop_meta,
                    },
                )
            fault_point("cvae.epoch")
            if on_epoch is not None:
                on_epoch(epoch, row)

        # 11. Keep the best-validated weights (the last epoch's when nothing was validated).
        if stopper is not None and stopper.best_weights is not None:
            model.load_state_dict(stopper.best_weights)
            for row in history:
                if row["epoch"] == stopper.best_epoch:
                    row["best"] = True

        # 12. Recompute BatchNorm running statistics with the final weights. The running averages are an
        #     exponential moving average (momentum 0.1) over the whole run, so a short run, or an early
        #     spike in activations, leaves them describing an older network; eval mode would then
        #     normalise with the wrong scale and reconstructions degrade although training loss is low.
        recalibrate_batchnorm(model, x_all, c_all, cfg.batch_size, shuffle_gen)

    # 13. Eval mode: BatchNorm uses its (recalibrated) running statistics and forward() uses z = mu.
    model.eval()
    return model, history


class EarlyStopping:
    """Validation-based stopping with the epoch budget as a ceiling.

    Every ``every`` epochs (and after the last) the caller scores the model; a score lower than the best so far
    by at least ``min_delta`` becomes the new best and its weights are copied. After ``patience`` checks in a row
    without such an improvement, :attr:`stopped` turns true. The state (best score, epoch, weights, count)
    travels in resumable saves, so a resumed run stops where an uninterrupted one would.
    """

    def __init__(self, every: int, patience: int, min_delta: float) -> None:
        self.every, self.patience, self.min_delta = int(every), int(patience), float(min_delta)
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.best_weights: dict[str, Tensor] | None = None
        self.bad_checks = 0

    @property
    def stopped(self) -> bool:
        return self.every > 0 and self.bad_checks >= self.patience

    def due(self, done: int, last: int) -> bool:
        """Whether to validate after ``done`` of ``last`` epochs."""
        return self.every > 0 and (done % self.every == 0 or done == last)

    def observe(self, epoch: int, score: float, model: nn.Module | None = None) -> None:
        """Record the check of ``epoch``; ``model``'s weights are kept when the score is the new best (without a
        model, e.g. to replay the rule on a recorded curve, only the scores are followed)."""
        if not math.isfinite(score):
            raise FloatingPointError(f"validation score is {score} at epoch {epoch}")
        if self.best is None or score < self.best - self.min_delta:
            self.best, self.best_epoch, self.bad_checks = score, epoch, 0
            if model is not None:
                self.best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            self.bad_checks += 1

    def state(self) -> tuple[dict[str, Tensor], dict]:
        tensors = {f"best.{k}": v for k, v in (self.best_weights or {}).items()}
        return tensors, {"best": self.best, "best_epoch": self.best_epoch, "bad_checks": self.bad_checks}

    def load(self, tensors: dict[str, Tensor], meta: dict | None) -> None:
        if not meta:
            return
        self.best, self.best_epoch, self.bad_checks = meta["best"], meta["best_epoch"], int(meta["bad_checks"])
        weights = {k.removeprefix("best."): v for k, v in tensors.items() if k.startswith("best.")}
        self.best_weights = weights or None


@torch.no_grad()
def recalibrate_batchnorm(
    model: ConditionalVAE, weights: Tensor, conds: Tensor, batch_size: int, generator: torch.Generator
) -> None:
    """Reset every BatchNorm layer's running statistics and re-estimate them from the final network.

    The forward passes run in training mode (batch statistics, reparameterised ``z``), exactly as the
    network saw its data during training, and the layers average the batch statistics with equal weight
    (``momentum=None``). Each batch's statistics depend on its random ``z`` draw, so the data is passed
    over as many times as needed to average at least :data:`RECALIBRATION_MIN_BATCHES` batches (one pass
    of a one-sample data set would freeze a single noisy draw into the eval-mode statistics). Inputs are
    the clean weights (no input noise), as at evaluation. The model is left in training mode; parameters
    are not changed.

    Args:
        model: The model to recalibrate.
        weights: ``[N, L]`` normalised weights on the model's device.
        conds: ``[N, C]`` conditions on the model's device.
        batch_size: Batch size used for training (BatchNorm statistics depend on it).
        generator: Generator for the batch order.
    """
    norms = [module for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    saved = [module.momentum for module in norms]
    for module in norms:
        module.reset_running_stats()
        module.momentum = None
    model.train()
    try:
        seen = 0
        while seen < RECALIBRATION_MIN_BATCHES:
            for idx in _batches(weights.shape[0], batch_size, generator):
                idx = idx.to(weights.device)
                model(weights[idx], conds[idx])
                seen += 1
    finally:
        for module, momentum in zip(norms, saved, strict=True):
            module.momentum = momentum


@torch.no_grad()
def reconstruction_error(model: ConditionalVAE, weights: Tensor, conds: Tensor, batch_size: int = 64) -> float:
    """Eval-mode mean squared error of ``model(x, cond)`` (with ``z = mu``) against ``x``.

    The model's training flag is restored afterwards.

    Args:
        model: A trained model.
        weights: ``[N, L]`` normalised weights.
        conds: ``[N, C]`` conditions.
        batch_size: Samples per forward pass (bounds memory only; the result does not depend on it).

    Returns:
        MSE over all ``N * L`` values.
    """
    if weights.shape[0] != conds.shape[0]:
        raise ValueError(f"weights has {weights.shape[0]} rows but conds has {conds.shape[0]}")
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        total = 0.0
        for start in range(0, weights.shape[0], batch_size):
            x = weights[start : start + batch_size].to(device=device, dtype=torch.float32)
            c = conds[start : start + batch_size].to(device=device, dtype=torch.float32)
            x_hat, _, _ = model(x, c)
            if x_hat.shape != x.shape:
                raise ValueError(f"model output {list(x_hat.shape)} does not match input {list(x.shape)}")
            total += (x_hat - x).pow(2).sum().item()
        return total / max(weights.numel(), 1)
    finally:
        model.train(was_training)


def adapter_validator(
    dataset: GeneratorDataset,
    norm: NormStats,
    cond_norm: ConditionNorm,
    score_adapters: Callable[[dict[str, dict[str, torch.Tensor]]], float],
) -> Callable[[ConditionalVAE], float]:
    """``model -> score``: decode every training category's adapter as generation would (eval mode, one z draw
    with :data:`VALIDATION_Z_SEED`, de-normalised, unflattened) and hand them to ``score_adapters``. The z draw
    comes from its own generator, so validating never moves torch's global random stream."""
    names = sorted(dataset.task_vectors)
    conds = cond_norm(torch.stack([dataset.task_vectors[n].float() for n in names]))

    @torch.no_grad()
    def validate(model: ConditionalVAE) -> float:
        device = next(model.parameters()).device
        # The same draw for every category, as Generator.generate(seed=VALIDATION_Z_SEED) makes for each.
        rng = torch.Generator(device="cpu").manual_seed(VALIDATION_Z_SEED)
        z = torch.randn(1, model.latent_dim, generator=rng).repeat(len(names), 1)
        flat = model.decode(z.to(device), conds.to(device)).float().cpu()
        rows = denormalize(flat, norm, dataset.layout)
        return score_adapters({n: unflatten_lora(rows[i], dataset.layout) for i, n in enumerate(names)})

    return validate


def train_generator(
    dataset: GeneratorDataset,
    cfg: CVAEConfig,
    adapter_config: dict[str, Any],
    device: str | torch.device = "cpu",
    on_epoch: Callable[[int, dict], None] | None = None,
    resume: Resumer | None = None,
    score_adapters: Callable[[dict[str, dict[str, torch.Tensor]]], float] | None = None,
) -> tuple[Generator, list[dict], float]:
    """Normalise the dataset, train the CVAE on all categories at once; return (generator, history, seconds).
    ``resume``: save resumable state every ``resume.every["epochs"]`` epochs and continue from a saved one.
    ``score_adapters``: scores ``{category: LoRA state dict}`` (lower is better, e.g. the mean validation NLL);
    with it, every ``cfg.val_every`` epochs each training category's adapter is generated (z drawn with seed
    :data:`VALIDATION_Z_SEED`) and scored, and training stops early on it (``icm_core.generator.train``)."""
    # 1) Per-tensor z-score (after per-coordinate centring with normalization='coordinate') over all
    #    checkpoints of all categories; the stats travel with the generator.
    norm = fit_norm_stats(dataset.weights, dataset.layout, center=cfg.normalization == "coordinate")
    weights = normalize(dataset.weights, norm, dataset.layout)
    # 2) Condition normalisation, fitted on the distinct category vectors (not weighted by trajectory length).
    cond_norm = ConditionNorm.fit(torch.stack([dataset.task_vectors[n] for n in sorted(dataset.task_vectors)]))
    conds = cond_norm(dataset.conds)
    # 3) One CVAE for every category.
    validate = None
    if score_adapters is not None and cfg.val_every > 0:
        validate = adapter_validator(dataset, norm, cond_norm, score_adapters)
    started = time.perf_counter()
    model, history = train_cvae(
        weights, conds, cfg, device=device, on_epoch=on_epoch, resume=resume, validate=validate
    )
    # Wall time is returned, not stored in the artifact: equal inputs must give byte-identical files.
    seconds = time.perf_counter() - started
    meta = {
        "num_checkpoints": int(dataset.weights.shape[0]),
        "categories": sorted(dataset.task_vectors),
    }
    generator = Generator(model, dataset.layout, norm, cond_norm, adapter_config, dict(dataset.task_vectors), meta)
    return generator, history, seconds
