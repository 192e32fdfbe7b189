"""What a generator really does: how far its adapters are from the checkpoints it was trained on, how much
they change with the random draw z, and how much information the CVAE's latent carries.

All distances are relative L2 distances between flattened LoRA weight vectors (every A and B matrix,
concatenated in layout order): ``||g - c|| / ||g||`` for a generated adapter ``g`` (one scale per adapter, so
the nearest checkpoint is the nearest in plain L2), ``||c - m|| / ||m||`` within a trajectory (``m`` its
mean) and across draws (``m`` the draws' mean). A
generated adapter much closer to one of its own category's training checkpoints than those checkpoints
are to each other is a reproduction of the training data, not a new adapter.

Latent usage: for every training checkpoint the CVAE's posterior ``q(z | x, c)`` is compared with the prior
``N(0, I)``; the KL divergence per latent dimension, averaged over checkpoints, is the information that
dimension carries. A dimension with less than :data:`ACTIVE_KL` nats is unused (a collapsed posterior); a
CVAE whose latent carries almost nothing decodes nearly the same weights for every z, i.e. it acts as a
deterministic map from task vector to weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import combinations
from typing import Any

import torch

from icm_core.lora.flatten import LoraLayout, flatten_lora, normalize


ACTIVE_KL: float = 0.01
"""A latent dimension with a mean KL to the prior above this many nats counts as used (active)."""


def relative_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` (float64); ``b`` must not be zero."""
    a, b = a.double(), b.double()
    norm = float(b.norm())
    if norm == 0.0:
        raise ValueError("relative_distance: reference vector is zero")
    return float((a - b).norm()) / norm


def draw_spread(vectors: Sequence[torch.Tensor]) -> dict[str, float] | None:
    """Spread of several draws for one condition: mean and max pairwise distance relative to the draws' mean
    norm, and each draw's mean distance to the draws' mean. None for fewer than two draws."""
    if len(vectors) < 2:
        return None
    stacked = torch.stack([v.double() for v in vectors])
    centre = stacked.mean(0)
    scale = float(centre.norm())
    if scale == 0.0:
        raise ValueError("draw_spread: the draws average to zero")
    pairs = [float((stacked[i] - stacked[j]).norm()) / scale for i, j in combinations(range(len(vectors)), 2)]
    return {
        "draws": len(vectors),
        "pairwise_mean": sum(pairs) / len(pairs),
        "pairwise_max": max(pairs),
        "to_mean": sum(float((row - centre).norm()) / scale for row in stacked) / len(vectors),
    }


def nearest_checkpoints(vector: torch.Tensor, checkpoints: Mapping[str, torch.Tensor], own: str) -> dict[str, Any]:
    """Distance of ``vector`` to the nearest training checkpoint of category ``own`` and of any other category,
    ``||vector - c|| / ||vector||``.

    Args:
        vector: ``[L]`` a generated adapter, flattened.
        checkpoints: category -> ``[N, L]`` its flattened training checkpoints.
        own: The category the adapter was generated for.
    """
    if own not in checkpoints:
        raise KeyError(f"no checkpoints of category {own!r} (have {sorted(checkpoints)})")
    out: dict[str, Any] = {"own": None, "own_index": None, "other": None, "other_category": None}
    for name, rows in checkpoints.items():
        dists = [relative_distance(row, vector) for row in rows]
        best = min(range(len(dists)), key=dists.__getitem__)
        if name == own:
            out["own"], out["own_index"] = dists[best], best
        elif out["other"] is None or dists[best] < out["other"]:
            out["other"], out["other_category"] = dists[best], name
    return out


def trajectory_spread(rows: torch.Tensor) -> dict[str, float]:
    """How far a category's own checkpoints are from each other: mean distance of each to the trajectory mean
    and mean distance between consecutive checkpoints (the scale to read a generated adapter's distance on)."""
    rows = rows.double()
    centre = rows.mean(0)
    to_mean = [relative_distance(row, centre) for row in rows]
    steps = [relative_distance(rows[i + 1], rows[i]) for i in range(rows.shape[0] - 1)]
    return {
        "to_mean": sum(to_mean) / len(to_mean),
        "consecutive": sum(steps) / len(steps) if steps else 0.0,
    }


def adapter_report(
    draws: Mapping[str, Sequence[Mapping[str, torch.Tensor]]],
    checkpoints: Mapping[str, Sequence[Mapping[str, torch.Tensor]]],
    finals: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per category: nearest-checkpoint distances of the first draw, spread across draws, distance to the
    category's final adapter, and the spread of its own trajectory.

    Args:
        draws: category -> generated LoRA state dicts (draw 0 first: the adapter the report scores).
        checkpoints: category -> its training checkpoints (state dicts).
        finals: category -> its final fine-tuned adapter (optional).
    """
    layout: LoraLayout | None = None
    flat_ckpts: dict[str, torch.Tensor] = {}
    for name in sorted(checkpoints):
        rows = []
        for state in checkpoints[name]:
            flat, layout = flatten_lora(state, layout)
            rows.append(flat)
        flat_ckpts[name] = torch.stack(rows)
    out = {}
    for name in sorted(draws):
        vectors = [flatten_lora(state, layout)[0] for state in draws[name]]
        row: dict[str, Any] = {"nearest": nearest_checkpoints(vectors[0], flat_ckpts, name)}
        row["z_spread"] = draw_spread(vectors)
        row["trajectory"] = trajectory_spread(flat_ckpts[name])
        if finals is not None and name in finals:
            row["to_final"] = relative_distance(flatten_lora(finals[name], layout)[0], vectors[0])
        out[name] = row
    return out


@torch.no_grad()
def latent_usage(generator, weights: torch.Tensor, conds: torch.Tensor) -> dict[str, Any]:
    """KL of the CVAE posterior to the prior per latent dimension, averaged over the training checkpoints.

    Args:
        generator: A loaded ``icm_core.generator.generator``.
        weights: ``[N, L]`` raw flattened training checkpoints (normalised here with the generator's stats).
        conds: ``[N, C]`` raw task vectors of those checkpoints.

    Returns:
        ``kl_total`` (nats, summed over dimensions), ``active_dims`` (mean KL > :data:`ACTIVE_KL`),
        ``latent_dim``, ``kl_max_dim`` and the posterior's mean standard deviation.
    """
    model = generator.model
    model.eval()
    x = normalize(weights.double(), generator.norm, generator.layout).float()
    c = generator.cond_norm(conds.float())
    device = next(model.parameters()).device
    mu, logvar = model.encode(x.to(device), c.to(device))
    per_dim = (0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar)).mean(0).double().cpu()
    return {
        "latent_dim": int(per_dim.numel()),
        "kl_total": float(per_dim.sum()),
        "kl_max_dim": float(per_dim.max()),
        "active_dims": int((per_dim > ACTIVE_KL).sum()),
        "posterior_std_mean": float(logvar.mul(0.5).exp().mean()),
    }
