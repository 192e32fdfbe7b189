"""COND P-DIFF's networks: the folding autoencoder, the conditional 1-D U-Net denoiser and the DDPM schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from icm_core.baselines.config import PDiffConfig


@dataclass(frozen=True)
class NoiseSchedule:
    """DDPM forward-process constants for a linear beta schedule."""

    betas: Tensor  # [T]
    alphas: Tensor
    alpha_bars: Tensor

    @classmethod
    def linear(cls, timesteps: int, beta_start: float, beta_end: float) -> NoiseSchedule:
        betas = torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
        alphas = 1.0 - betas
        return cls(betas, alphas, torch.cumprod(alphas, dim=0))

    @property
    def timesteps(self) -> int:
        return int(self.betas.numel())

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """q(x_t | x_0) = N(sqrt(a_bar_t) x_0, (1 - a_bar_t) I), sampled with the given noise."""
        a_bar = self.alpha_bars.to(x0.device)[t].float().view(-1, *([1] * (x0.dim() - 1)))
        return a_bar.sqrt() * x0 + (1 - a_bar).sqrt() * noise

    def posterior_variance(self) -> Tensor:
        """beta_tilde_t = beta_t (1 - a_bar_{t-1}) / (1 - a_bar_t), the variance of q(x_{t-1} | x_t, x_0)."""
        prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bars[:-1]])
        return self.betas * (1 - prev) / (1 - self.alpha_bars)


def ae_padded_length(length: int, fold_rate: int, depth: int) -> int:
    """Smallest multiple of fold_rate**depth that is >= length (the official code always adds one block)."""
    block = fold_rate**depth
    return math.ceil(length / block) * block


class FoldingAutoencoder(nn.Module):
    """COND P-DIFF's 1-D convolutional autoencoder: each layer folds the sequence by ``fold_rate``."""

    def __init__(self, input_len: int, cfg: PDiffConfig) -> None:
        super().__init__()
        self.cfg, self.input_len = cfg, input_len
        depth, fold, k = len(cfg.ae_enc_channels), cfg.fold_rate, cfg.ae_kernel_size
        self.padded_len = ae_padded_length(input_len, fold, depth)
        self.latent_shape = (cfg.ae_enc_channels[-1], self.padded_len // fold**depth)
        enc = [1, *cfg.ae_enc_channels]
        self.encoder = nn.ModuleList()
        for i in range(depth):
            last = i == depth - 1
            self.encoder.append(
                nn.Sequential(
                    nn.Identity() if i == 0 else nn.LeakyReLU(),
                    nn.InstanceNorm1d(enc[i]),
                    nn.Conv1d(enc[i], enc[i], k, padding=k // 2),
                    nn.LeakyReLU(),
                    nn.InstanceNorm1d(enc[i]),
                    nn.Conv1d(enc[i], enc[i + 1], fold, stride=fold),  # fold the length by fold_rate
                    nn.Tanh() if last else nn.Identity(),
                )
            )
        dec = [*cfg.ae_dec_channels, 1]
        if dec[0] != enc[-1]:
            raise ValueError(f"ae_dec_channels[0] = {dec[0]} must equal ae_enc_channels[-1] = {enc[-1]}")
        self.decoder = nn.ModuleList()
        for i in range(len(cfg.ae_dec_channels)):
            self.decoder.append(
                nn.Sequential(
                    nn.LeakyReLU(),
                    nn.InstanceNorm1d(dec[i]),
                    nn.ConvTranspose1d(dec[i], dec[i], fold, stride=fold),  # unfold by fold_rate
                    nn.LeakyReLU(),
                    nn.InstanceNorm1d(dec[i]),
                    nn.Conv1d(dec[i], dec[i + 1], k, padding=k // 2),
                )
            )
        if len(cfg.ae_dec_channels) != depth:
            raise ValueError("ae_dec_channels must have as many layers as ae_enc_channels")

    def encode(self, x: Tensor) -> Tensor:
        """[B, L] -> latent [B, C, L_pad / fold**depth] in [-1, 1]."""
        if x.dim() != 2 or x.shape[1] != self.input_len:
            raise ValueError(f"expected [B, {self.input_len}], got {list(x.shape)}")
        h = F.pad(x, (0, self.padded_len - self.input_len)).unsqueeze(1)
        for layer in self.encoder:
            h = layer(h)
        return h

    def decode(self, latent: Tensor) -> Tensor:
        h = latent
        for layer in self.decoder:
            h = layer(h)
        return h[:, 0, : self.input_len]

    def forward(self, x: Tensor) -> Tensor:
        """Training pass with the official noise augmentation on input and latent."""
        x = noisy(x, self.cfg.ae_input_noise)
        latent = noisy(self.encode(x), self.cfg.ae_latent_noise).clamp(-1, 1)
        return self.decode(latent)


def noisy(x: Tensor, factor: float) -> Tensor:
    """x * (1 - f) + f * N(0, I): the official augmentation (it also shrinks x slightly)."""
    return x if factor <= 0 else x * (1 - factor) + factor * torch.randn_like(x)


class ResBlock1d(nn.Module):
    """GroupNorm -> SiLU -> conv, twice, with the time embedding added in between; residual."""

    def __init__(self, in_ch: int, out_ch: int, time_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(min(8, in_ch), in_ch)
        self.conv1 = nn.Conv1d(in_ch, out_ch, 3, padding=1)
        self.time = nn.Linear(time_dim, out_ch)
        self.norm2 = nn.GroupNorm(min(8, out_ch), out_ch)
        self.conv2 = nn.Conv1d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv1d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time(temb).unsqueeze(-1)
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class ConditionalUNet1d(nn.Module):
    """1-D U-Net epsilon predictor. The condition becomes ``cond_tokens`` extra sequence positions."""

    def __init__(self, latent_shape: tuple[int, int], cond_dim: int, cfg: PDiffConfig) -> None:
        super().__init__()
        channels, length = latent_shape
        self.latent_shape, self.cond_dim, self.cfg = latent_shape, cond_dim, cfg
        levels = len(cfg.unet_channels)
        multiple = 2 ** (levels - 1)
        self.seq_len = math.ceil((length + cfg.cond_tokens) / multiple) * multiple
        time_dim = cfg.unet_channels[0] * 4
        self.time_embed = nn.Sequential(
            nn.Embedding(cfg.timesteps, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim)
        )
        self.cond_proj = nn.Linear(cond_dim, channels * cfg.cond_tokens)
        self.inp = nn.Conv1d(channels, cfg.unet_channels[0], 3, padding=1)
        self.down = nn.ModuleList()
        prev = cfg.unet_channels[0]
        for ch in cfg.unet_channels:
            self.down.append(ResBlock1d(prev, ch, time_dim))
            prev = ch
        self.mid = ResBlock1d(prev, prev, time_dim)
        self.up = nn.ModuleList()
        for ch in reversed(cfg.unet_channels):
            self.up.append(ResBlock1d(prev + ch, ch, time_dim))
            prev = ch
        self.out = nn.Sequential(nn.GroupNorm(min(8, prev), prev), nn.SiLU(), nn.Conv1d(prev, channels, 3, padding=1))

    def forward(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """Predict the noise in ``x`` [B, C, L] at steps ``t`` [B] given conditions ``cond`` [B, cond_dim]."""
        batch, channels, length = x.shape
        if (channels, length) != self.latent_shape:
            raise ValueError(f"latent shape {(channels, length)} != {self.latent_shape}")
        if cond.shape != (batch, self.cond_dim):
            raise ValueError(f"condition shape {list(cond.shape)} != [{batch}, {self.cond_dim}]")
        # Condition concatenated along the sequence axis, then zero-padded to a multiple of 2**(levels-1).
        cond_seq = self.cond_proj(cond).view(batch, channels, self.cfg.cond_tokens)
        h = torch.cat([x, cond_seq], dim=2)
        h = F.pad(h, (0, self.seq_len - h.shape[2]))
        temb = self.time_embed(t)
        h = self.inp(h)
        skips = []
        for i, block in enumerate(self.down):
            h = block(h, temb)
            skips.append(h)
            if i < len(self.down) - 1:
                h = F.avg_pool1d(h, 2)
        h = self.mid(h, temb)
        for block in self.up:
            skip = skips.pop()
            if h.shape[-1] != skip.shape[-1]:
                h = F.interpolate(h, size=skip.shape[-1], mode="nearest")
            h = block(torch.cat([h, skip], dim=1), temb)
        return self.out(h)[:, :, :length]
