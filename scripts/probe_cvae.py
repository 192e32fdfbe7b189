"""Probe the CVAE's cost and its ability to learn a small multi-task data set on this machine.

Two measurements:

1. ``--timing``: parameter count and seconds per training step (forward + backward + AdamW step) for
   the official 12-layer plan and a half-width plan at input length 30720, latent 256, condition 576,
   batch 8.
2. (default) train on 40 vectors of length 30720 made of 5 groups of 8 similar vectors (group centre
   ~ N(0, 1), member = centre + 0.05 * noise, condition = one random 576-d vector per group scaled to
   norm 1), then draw z ~ N(0, I) in eval mode for each group's condition and report the MSE of the
   sampled output against the group centre.

Usage::

    .venv/bin/python scripts/probe_cvae.py --timing
    .venv/bin/python scripts/probe_cvae.py            # official plan, latent 256, KL 0.005, 80 epochs
    .venv/bin/python scripts/probe_cvae.py --channels 8,16,32,16 --latent 16 --kld-weight 0.5 --lr 3e-3 --epochs 60

Seen on the 2-core development VM (torch 2.13 CPU), batch 8, lr cosine to 1e-5, config seed 2024:

* official plan: 2,642,705 params, 0.17 s/step with 2 threads on an idle machine; half-width plan:
  999,705 params, 0.08 s/step. With one other busy process on the 2 cores, 2 threads fell to ~5 s/step
  (OpenMP spin-waiting) while ``--threads 1`` gave 0.34 / 0.13 s/step: use one thread on a shared box.
* official plan, latent 256, KL 0.005, lr 2e-3, 80 epochs (200 steps): 137 s with ``--threads 1`` on the
  shared machine, sampled MSE vs centre 0.0036 (120 epochs: 0.00095). Half-width, 120 epochs: 0.083.
* (8,16,32,16), latent 16, KL 0.5, lr 3e-3, 60 epochs: 73-84 s, sampled MSE 0.0064 (100 epochs: 0.0017).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from icm_core.generator.config import OFFICIAL_CHANNELS, CVAEConfig
from icm_core.generator.cvae import ConditionalVAE, cvae_loss
from icm_core.generator.train import reconstruction_error, train_cvae


HALF_CHANNELS: tuple[int, ...] = tuple(c // 2 for c in OFFICIAL_CHANNELS)


def time_plan(channels: tuple[int, ...], length: int, latent: int, cond_dim: int, batch: int, steps: int) -> None:
    """Print the parameter count and the median seconds per training step of one channel plan."""
    torch.manual_seed(0)
    cfg = CVAEConfig(channels=channels, latent_dim=latent)
    model = ConditionalVAE(length, cond_dim, cfg).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    x = torch.randn(batch, length)
    cond = torch.randn(batch, cond_dim)
    times = []
    for _ in range(steps + 2):
        start = time.perf_counter()
        x_hat, mu, logvar = model(x, cond)
        loss, _, _ = cvae_loss(x_hat, x, mu, logvar, cfg.kld_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    n_params = sum(p.numel() for p in model.parameters())
    # The first two steps include allocator / kernel warm-up.
    print(
        f"channels={channels} L={length} latent={latent} cond={cond_dim} batch={batch}: "
        f"params={n_params:,} s/step median={statistics.median(times[2:]):.3f} "
        f"min={min(times[2:]):.3f} max={max(times[2:]):.3f}"
    )


def make_groups(
    groups: int, per_group: int, length: int, cond_dim: int, spread: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (weights [G*M, L], conds [G*M, C], centres [G, L], group conds [G, C])."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(groups, length, generator=gen)
    group_conds = torch.randn(groups, cond_dim, generator=gen)
    group_conds = group_conds / group_conds.norm(dim=1, keepdim=True)
    members = centres.repeat_interleave(per_group, dim=0)
    weights = members + spread * torch.randn(members.shape, generator=gen)
    conds = group_conds.repeat_interleave(per_group, dim=0)
    return weights, conds, centres, group_conds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timing", action="store_true", help="time the official and half-width plans")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--length", type=int, default=30720)
    parser.add_argument("--cond-dim", type=int, default=576)
    parser.add_argument(
        "--channels", default=",".join(map(str, OFFICIAL_CHANNELS)), help="comma-separated encoder channel plan"
    )
    parser.add_argument("--latent", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=80)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--kld-weight", type=float, default=0.005)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--input-noise", type=float, default=0.0)
    parser.add_argument("--draws", type=int, default=8, help="z draws per group when scoring")
    parser.add_argument("--seed", type=int, default=0, help="data seed (the CVAE seed is the config's)")
    parser.add_argument("--every", type=int, default=10, help="print a history row every N epochs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.timing:
        for channels in (OFFICIAL_CHANNELS, HALF_CHANNELS):
            time_plan(channels, args.length, 256, args.cond_dim, batch=8, steps=8)
        return

    channels = tuple(int(c) for c in args.channels.split(","))
    cfg = CVAEConfig(
        channels=channels,
        latent_dim=args.latent,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        kld_weight=args.kld_weight,
        weight_decay=args.weight_decay,
        input_noise=args.input_noise,
    )
    weights, conds, centres, group_conds = make_groups(5, 8, args.length, args.cond_dim, 0.05, args.seed)
    n_params = sum(p.numel() for p in ConditionalVAE(args.length, args.cond_dim, cfg).parameters())
    print(f"config: {cfg.model_dump()}  params={n_params:,}", flush=True)

    def report(epoch: int, row: dict) -> None:
        if epoch % args.every == 0 or epoch == cfg.epochs - 1:
            print(
                f"epoch {epoch:4d} loss {row['loss']:.5f} recon {row['recon']:.5f} kld {row['kld']:.4f} "
                f"lr {row['lr']:.2e} t={time.perf_counter() - start:.1f}s",
                flush=True,
            )

    start = time.perf_counter()
    model, _ = train_cvae(weights, conds, cfg, on_epoch=report)
    train_s = time.perf_counter() - start

    gen = torch.Generator().manual_seed(123)
    per_group = torch.zeros(centres.shape[0])
    for _ in range(args.draws):
        out = model.sample(group_conds, generator=gen)
        per_group += (out - centres).pow(2).mean(dim=1) / args.draws
    # Spread of the data itself: a member is 0.05 * noise away from its centre (MSE ~ 0.0025).
    print(f"train time {train_s:.1f}s  ({train_s / cfg.epochs:.2f} s/epoch)")
    print(f"eval recon MSE (z = mu) vs members: {reconstruction_error(model, weights, conds):.5f}")
    print(f"sampled MSE vs group centre, per group: {[round(v, 5) for v in per_group.tolist()]}")
    print(f"sampled MSE vs group centre, max over groups: {per_group.max().item():.5f}")


if __name__ == "__main__":
    main()
