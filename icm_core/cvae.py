"""The conditional VAE that generates flattened, normalised LoRA weights from a task vector.

The architecture follows the official ICM-LoRA ``model/CVAE_design.py`` (itself p-diff v2's
``OneDimVAE`` with a condition added), generalised to any depth:

* encoder: ``depth`` blocks ``Conv1d(k, stride 2) -> BatchNorm1d -> LeakyReLU`` over the zero-padded
  weight vector seen as a one-channel signal, then ``to_latent``; the condition (task vector) is
  concatenated to that latent code before ``fc_mu`` / ``fc_logvar``, so the posterior sees both the
  LoRA and its task (paper, Sec. 3);
* decoder: ``Linear(latent + cond)`` back to the last feature map, ``depth - 1`` blocks
  ``ConvTranspose1d(k, stride 2) -> BatchNorm1d -> ELU`` mirroring the encoder channels, a final
  ``ConvTranspose1d -> BatchNorm1d -> ELU -> Conv1d(-> 1 channel)``; the output is cropped back to the
  input length.

Defects of the official code that are deliberately not repeated here:

* the reconstruction loss compares ``[B, L]`` with ``[B, L]`` only (:func:`cvae_loss` raises on any shape
  mismatch; the official ``mse_loss(recons[B, L], x[B, 1, L])`` broadcast to ``[B, B, L]`` and
  compared every sample with every target in the batch);
* the optimizer exists before it is used, and training is deterministic for a given seed;
* one model is trained on all tasks at once (the condition is an input, not a per-task model).

This module is plain PyTorch; orchestration (Prefect tasks, artifacts) lives elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from icm_core.config import CVAEConfig
from icm_core.faults import fault_point
from icm_core.resume import (
    Resumer,
    load_module,
    load_optimizer_state,
    load_rng_state,
    module_tensors,
    optimizer_state,
    rng_state,
)


__all__ = [
    "ConditionalVAE",
    "EarlyStopping",
    "bounded_logvar",
    "cvae_loss",
    "padded_length",
    "recalibrate_batchnorm",
    "reconstruction_error",
    "train_cvae",
]

GRAD_CLIP_NORM: float = 1.0
"""Global gradient-norm clip used by :func:`train_cvae`."""

LOGVAR_BOUND: float = 6.0
"""The encoder's log-variance is squashed softly into ``(-LOGVAR_BOUND, LOGVAR_BOUND)`` (posterior std between
0.05 and 20): see :func:`bounded_logvar`."""

RECALIBRATION_MIN_BATCHES: int = 32
"""BatchNorm recalibration averages the statistics of at least this many training-mode batches."""


def bounded_logvar(raw: Tensor, bound: float = LOGVAR_BOUND) -> Tensor:
    """``bound * tanh(raw / bound)``: close to ``raw`` near 0, never beyond ``+-bound``, gradient never zero.

    Why: with a shallow encoder the last feature map is long (4 layers over 122,880 weights leave 61,440
    features for ``to_latent``), and AdamW moves each of those weights by about ``lr`` per step, so the
    pre-activation of ``fc_logvar`` can jump by tens in one step; ``exp(logvar)`` in the KL term then
    overflows (the ``depth-4-rank-8`` ablation stopped with ``kld: inf`` in its first epoch). A hard clamp
    would stop the gradient at the bound and could leave the log-variance stuck there; tanh keeps a
    (small) gradient that brings it back.
    """
    return bound * torch.tanh(raw / bound)


def padded_length(length: int, depth: int) -> int:
    """Smallest multiple of ``2**depth`` that is at least ``length``.

    Every stride-2 layer halves the signal, so the padded length must divide by ``2**depth`` for the
    decoder's doublings to land exactly back on it.

    Args:
        length: Unpadded input length (>= 1).
        depth: Number of stride-2 layers (>= 0).

    Returns:
        The padded length.

    Raises:
        ValueError: If ``length < 1`` or ``depth < 0``.
    """
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    if depth < 0:
        raise ValueError(f"depth must be >= 0, got {depth}")
    block = 1 << depth
    return -(-length // block) * block


class ConditionalVAE(nn.Module):
    """1-D convolutional conditional VAE over flattened LoRA weights.

    Attributes:
        input_len: Length ``L`` of the flattened weight vectors it reads and writes.
        cond_dim: Size ``C`` of the condition (task vector).
        cfg: The :class:`CVAEConfig` it was built from (with ``input_len`` and ``cond_dim`` enough to
            rebuild the module before loading a state dict).
        padded_len: ``padded_length(input_len, depth)``.
        last_len: Length of the encoder's last feature map, ``padded_len // 2**depth``.
    """

    def __init__(self, input_len: int, cond_dim: int, cfg: CVAEConfig) -> None:
        """Build the encoder and decoder.

        Args:
            input_len: Length ``L`` of the flattened weight vectors (>= 1).
            cond_dim: Size of the condition vector (>= 1).
            cfg: Channel plan, kernel size and latent size (training fields are not used here).

        Raises:
            ValueError: If ``input_len`` or ``cond_dim`` is not positive.
        """
        super().__init__()
        if input_len < 1:
            raise ValueError(f"input_len must be >= 1, got {input_len}")
        if cond_dim < 1:
            raise ValueError(f"cond_dim must be >= 1, got {cond_dim}")
        self.input_len = int(input_len)
        self.cond_dim = int(cond_dim)
        self.cfg = cfg
        channels = tuple(cfg.channels)
        depth = len(channels)
        k = cfg.kernel_size
        pad = k // 2
        self.padded_len = padded_length(self.input_len, depth)
        self.last_len = self.padded_len >> depth
        self.latent_dim = cfg.latent_dim
        flat = self.last_len * channels[-1]

        # Encoder: with an odd kernel, padding k//2 and stride 2, each block halves an even length exactly.
        blocks: list[nn.Module] = []
        in_ch = 1
        for out_ch in channels:
            blocks.append(
                nn.Sequential(
                    nn.Conv1d(in_ch, out_ch, k, stride=2, padding=pad),
                    nn.BatchNorm1d(out_ch),
                    nn.LeakyReLU(),
                )
            )
            in_ch = out_ch
        self.encoder = nn.Sequential(*blocks)
        self.to_latent = nn.Linear(flat, cfg.latent_dim)
        # The condition joins after to_latent (as in the official code) so its size does not depend on L.
        self.fc_mu = nn.Linear(cfg.latent_dim + self.cond_dim, cfg.latent_dim)
        self.fc_logvar = nn.Linear(cfg.latent_dim + self.cond_dim, cfg.latent_dim)

        # Decoder: mirror of the encoder. With padding k//2 and output_padding 1, a stride-2
        # ConvTranspose1d maps length n to exactly 2n for any odd k.
        self.decoder_input = nn.Linear(cfg.latent_dim + self.cond_dim, flat)
        rev = channels[::-1]
        up: list[nn.Module] = []
        for i in range(depth - 1):
            up.append(
                nn.Sequential(
                    nn.ConvTranspose1d(rev[i], rev[i + 1], k, stride=2, padding=pad, output_padding=1),
                    nn.BatchNorm1d(rev[i + 1]),
                    nn.ELU(),
                )
            )
        # An empty Sequential is the identity, so depth == 1 needs no special case.
        self.decoder = nn.Sequential(*up)
        last_ch = rev[-1]
        self.final_layer = nn.Sequential(
            nn.ConvTranspose1d(last_ch, last_ch, k, stride=2, padding=pad, output_padding=1),
            nn.BatchNorm1d(last_ch),
            nn.ELU(),
            nn.Conv1d(last_ch, 1, k, stride=1, padding=pad),
        )

    def _check_cond(self, cond: Tensor, batch: int) -> None:
        if cond.dim() != 2 or cond.shape[1] != self.cond_dim or cond.shape[0] != batch:
            raise ValueError(f"cond must be [{batch}, {self.cond_dim}], got {list(cond.shape)}")

    def encode(self, x: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior parameters of ``q(z | x, cond)``.

        Args:
            x: ``[B, input_len]`` normalised weight vectors.
            cond: ``[B, cond_dim]`` task vectors.

        Returns:
            ``(mu, logvar)``, each ``[B, latent_dim]``; ``logvar`` is bounded by :func:`bounded_logvar`.

        Raises:
            ValueError: On a shape mismatch.
        """
        if x.dim() != 2 or x.shape[1] != self.input_len:
            raise ValueError(f"x must be [B, {self.input_len}], got {list(x.shape)}")
        self._check_cond(cond, x.shape[0])
        # Zero-pad on the right so every stride-2 layer sees an even length.
        h = F.pad(x, (0, self.padded_len - self.input_len)).unsqueeze(1)
        h = self.encoder(h).flatten(1)
        h = torch.cat([self.to_latent(h), cond], dim=1)
        return self.fc_mu(h), bounded_logvar(self.fc_logvar(h))

    def decode(self, z: Tensor, cond: Tensor) -> Tensor:
        """Decode latent codes under their conditions.

        Args:
            z: ``[B, latent_dim]`` latent codes.
            cond: ``[B, cond_dim]`` task vectors.

        Returns:
            ``[B, input_len]`` reconstructed normalised weights.

        Raises:
            ValueError: On a shape mismatch.
        """
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"z must be [B, {self.latent_dim}], got {list(z.shape)}")
        self._check_cond(cond, z.shape[0])
        h = self.decoder_input(torch.cat([z, cond], dim=1))
        h = h.view(z.shape[0], self.cfg.channels[-1], self.last_len)
        h = self.final_layer(self.decoder(h))
        # Drop the channel axis and the zero padding: the output is exactly [B, input_len].
        return h[:, 0, : self.input_len]

    def forward(self, x: Tensor, cond: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Encode, draw ``z`` and decode.

        In training mode ``z = mu + exp(logvar / 2) * eps`` (reparameterisation, so gradients reach the
        encoder); in eval mode ``z = mu`` so reconstructions are deterministic.

        Args:
            x: ``[B, input_len]`` normalised weight vectors.
            cond: ``[B, cond_dim]`` task vectors.

        Returns:
            ``(x_hat, mu, logvar)`` with ``x_hat`` of shape ``[B, input_len]``.
        """
        mu, logvar = self.encode(x, cond)
        if self.training:
            z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        else:
            z = mu
        return self.decode(z, cond), mu, logvar

    @torch.no_grad()
    def sample(self, cond: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Generate weights for each condition from ``z ~ N(0, I)`` (the paper's generation step).

        The caller puts the model in eval mode first; in training mode BatchNorm would use the
        statistics of this batch and update its running averages.

        Args:
            cond: ``[B, cond_dim]`` task vectors.
            generator: Optional generator for ``z`` (on ``cond``'s device) for reproducible draws.

        Returns:
            ``[B, input_len]`` generated normalised weights.
        """
        if cond.dim() != 2 or cond.shape[1] != self.cond_dim:
            raise ValueError(f"cond must be [B, {self.cond_dim}], got {list(cond.shape)}")
        z = torch.randn(cond.shape[0], self.latent_dim, generator=generator, device=cond.device, dtype=cond.dtype)
        return self.decode(z, cond)


def cvae_loss(
    x_hat: Tensor, x: Tensor, mu: Tensor, logvar: Tensor, kld_weight: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The CVAE objective: reconstruction MSE plus weighted KL divergence to ``N(0, I)``.

    Args:
        x_hat: ``[B, L]`` reconstructions.
        x: ``[B, L]`` targets; must have exactly ``x_hat``'s shape.
        mu: ``[B, D]`` posterior means.
        logvar: ``[B, D]`` posterior log-variances.
        kld_weight: Weight of the KL term (paper: 0.005).

    Returns:
        ``(loss, recon, kld)``: ``recon`` is the per-sample MSE (mean over ``L``) averaged over the batch,
        ``kld`` is the KL divergence summed over latent dims and averaged over the batch, and
        ``loss = recon + kld_weight * kld``.

    Raises:
        ValueError: If ``x_hat.shape != x.shape`` or ``mu.shape != logvar.shape``.
    """
    # Never let broadcasting decide: [B, L] vs [B, 1, L] silently becomes [B, B, L] (the official bug).
    if x_hat.shape != x.shape:
        raise ValueError(f"x_hat and x shapes differ: {list(x_hat.shape)} vs {list(x.shape)}")
    if mu.shape != logvar.shape:
        raise ValueError(f"mu and logvar shapes differ: {list(mu.shape)} vs {list(logvar.shape)}")
    recon = (x_hat - x).pow(2).flatten(1).mean(dim=1).mean()
    kld = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(dim=1)).mean()
    return recon + kld_weight * kld, recon, kld


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
            is bit-identical to an uninterrupted run (``icm_core.resume``).
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
            load_module(model, saved.tensors, "model.")
            load_optimizer_state(optimizer, saved.tensors, saved.meta["optimizer"], "optimizer.")
            scheduler.load_state_dict(saved.meta["scheduler"])
            load_rng_state(saved.tensors, {"shuffle": shuffle_gen})
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
                opt_tensors, opt_meta = optimizer_state(optimizer, "optimizer.")
                stop_tensors, stop_meta = stopper.state() if stopper is not None else ({}, None)
                resume.save(
                    epoch + 1,
                    {
                        **module_tensors(model, "model."),
                        **opt_tensors,
                        **rng_state({"shuffle": shuffle_gen}),
                        **stop_tensors,
                    },
                    {
                        "label": f"epoch {epoch + 1}",
                        "optimizer": opt_meta,
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
