"""Generator diagnostics: distances to training checkpoints, spread across z draws, latent usage."""

from __future__ import annotations

import pytest
import torch

from icm_core.evaluation.diagnostics import (
    adapter_report,
    draw_spread,
    latent_usage,
    nearest_checkpoints,
    relative_distance,
    trajectory_spread,
)
from icm_core.generator.config import CVAEConfig
from icm_core.generator.dataset import build_dataset
from icm_core.generator.train import train_generator


def state(seed: int, shift: float = 0.0, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "m.layers.0.q.lora_A.weight": (torch.randn(2, 24, generator=g) + shift) * scale,
        "m.layers.0.q.lora_B.weight": (torch.randn(16, 2, generator=g) - shift) * scale,
    }


def test_relative_distance_and_spread():
    a, b = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 5.0])
    assert relative_distance(a, b) == pytest.approx(((9 + 1) ** 0.5) / 5)
    assert relative_distance(b, b) == 0.0
    with pytest.raises(ValueError, match="zero"):
        relative_distance(a, torch.zeros(2))
    assert draw_spread([a]) is None
    same = draw_spread([a, a.clone(), a.clone()])
    assert same["pairwise_mean"] == 0.0 and same["pairwise_max"] == 0.0 and same["draws"] == 3
    # Two draws 2% apart around their mean: pairwise 2%, each 1% from the mean.
    centre = torch.ones(100)
    delta = torch.zeros(100)
    delta[0] = 0.01 * float(centre.norm())
    spread = draw_spread([centre + delta, centre - delta])
    assert spread["pairwise_mean"] == pytest.approx(0.02) and spread["to_mean"] == pytest.approx(0.01)


def test_nearest_checkpoints_finds_own_and_other():
    own = torch.stack([torch.tensor([1.0, 0.0]), torch.tensor([2.0, 0.0])])
    other = torch.stack([torch.tensor([0.0, 1.0])])
    far = torch.stack([torch.tensor([0.0, -9.0])])
    got = nearest_checkpoints(torch.tensor([1.9, 0.1]), {"a": own, "b": other, "c": far}, "a")
    g = torch.tensor([1.9, 0.1])
    assert got["own_index"] == 1 and got["own"] == pytest.approx(float((g - own[1]).norm() / g.norm()))
    assert got["other_category"] == "b"
    with pytest.raises(KeyError, match="zzz"):
        nearest_checkpoints(torch.ones(2), {"a": own}, "zzz")


def test_adapter_report_tells_a_copy_from_a_new_adapter():
    checkpoints = {"a": [state(i, 1.0) for i in range(4)], "b": [state(10 + i, -1.0) for i in range(4)]}
    finals = {"a": checkpoints["a"][-1], "b": checkpoints["b"][-1]}
    copy = {k: v.clone() for k, v in checkpoints["a"][2].items()}
    new = state(99, 1.0)
    report = adapter_report({"a": [copy, new], "b": [state(50, -1.0)]}, checkpoints, finals)
    a, b = report["a"], report["b"]
    assert a["nearest"]["own"] == 0.0 and a["nearest"]["own_index"] == 2  # a stored checkpoint, reproduced
    assert a["nearest"]["other_category"] == "b" and a["nearest"]["other"] > 1.0
    assert a["to_final"] > 0 and a["z_spread"]["draws"] == 2 and a["z_spread"]["pairwise_mean"] > 0.5
    assert b["z_spread"] is None and b["nearest"]["own"] > 0.3
    assert 0 < a["trajectory"]["to_mean"] < a["trajectory"]["consecutive"]


def test_latent_usage_of_a_trained_cvae():
    checkpoints = {"a": [state(i, 1.0) for i in range(6)], "b": [state(10 + i, -1.0) for i in range(6)]}
    vectors = {"a": torch.tensor([1.0, 0.0, 0.0]), "b": torch.tensor([0.0, 1.0, 0.0])}
    dataset = build_dataset(checkpoints, vectors)
    cfg = CVAEConfig(channels=(4, 8), latent_dim=6, epochs=30, batch_size=4)
    generator, history, _ = train_generator(dataset, cfg, {"r": 2, "lora_alpha": 8})
    usage = latent_usage(generator, dataset.weights, dataset.conds)
    assert usage["latent_dim"] == 6 and 0 <= usage["active_dims"] <= 6
    assert usage["kl_total"] >= 0 and usage["kl_max_dim"] <= usage["kl_total"] + 1e-12
    assert usage["posterior_std_mean"] > 0
    # The same quantity the training loop logs (KL summed over dims, mean over checkpoints), in eval mode.
    assert usage["kl_total"] == pytest.approx(history[-1]["kld"], rel=0.5, abs=0.5)


def test_trajectory_spread_scale():
    rows = torch.stack([torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.2])])
    spread = trajectory_spread(rows)
    assert spread["to_mean"] == pytest.approx(0.1 / float(torch.tensor([1.0, 0.1]).norm()))
    assert spread["consecutive"] == pytest.approx(0.2)
