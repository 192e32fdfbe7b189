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

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from icm_core.generator.config import CVAEConfig


__all__ = [
    "ConditionalVAE",
    "bounded_logvar",
    "cvae_loss",
    "padded_length",
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
