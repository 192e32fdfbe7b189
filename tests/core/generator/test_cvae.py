"""Tests of the conditional VAE: shapes, loss, overfitting, multi-task sampling, determinism."""

from __future__ import annotations

import math

import pytest
import torch

from icm_core.generator.config import OFFICIAL_CHANNELS, CVAEConfig
from icm_core.generator.cvae import ConditionalVAE, cvae_loss, padded_length


# Small channel plans keep the whole file fast on 2 CPU cores.
PLANS: dict[int, tuple[int, ...]] = {
    1: (4,),
    3: (4, 8, 4),
    6: (4, 8, 8, 8, 8, 4),
    12: OFFICIAL_CHANNELS,
}


# --------------------------------------------------------------------------------------------- padding


@pytest.mark.parametrize(
    ("length", "depth", "expected"),
    [
        (1, 0, 1),
        (1, 1, 2),
        (1000, 3, 1000),
        (1001, 3, 1008),
        (4096, 12, 4096),
        (4097, 12, 8192),
        (1000, 12, 4096),
        (5000, 12, 8192),
        (30720, 12, 32768),
        (30720, 4, 30720),
    ],
)
def test_padded_length(length: int, depth: int, expected: int) -> None:
    assert padded_length(length, depth) == expected


def test_padded_length_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        padded_length(0, 3)
    with pytest.raises(ValueError):
        padded_length(10, -1)


# ---------------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("depth", [1, 3, 6, 12])
@pytest.mark.parametrize("length", [1000, 4096, 5000])
def test_output_shapes(depth: int, length: int) -> None:
    cfg = CVAEConfig(channels=PLANS[depth], latent_dim=8)
    model = ConditionalVAE(length, 5, cfg)
    assert model.padded_len == padded_length(length, depth)
    assert model.last_len == model.padded_len // 2**depth
    x = torch.randn(2, length)
    cond = torch.randn(2, 5)

    x_hat, mu, logvar = model(x, cond)  # training mode: reparameterised z
    assert x_hat.shape == (2, length)
    assert mu.shape == logvar.shape == (2, 8)

    model.eval()
    x_hat, _, _ = model(x, cond)
    assert x_hat.shape == (2, length)
    assert model.decode(torch.randn(3, 8), torch.randn(3, 5)).shape == (3, length)
    assert model.sample(torch.randn(4, 5)).shape == (4, length)


def test_official_plan_on_short_input() -> None:
    """The 12-layer official plan pads 1000 to 4096, so its last feature map has length 1."""
    model = ConditionalVAE(1000, 7, CVAEConfig())
    assert model.padded_len == 4096
    assert model.last_len == 1
    assert len(model.encoder) == 12
    assert len(model.decoder) == 11
    x_hat, mu, _ = model(torch.randn(2, 1000), torch.randn(2, 7))
    assert x_hat.shape == (2, 1000)
    assert mu.shape == (2, 256)


def test_rebuild_from_stored_attributes() -> None:
    cfg = CVAEConfig(channels=(4, 8), latent_dim=3)
    model = ConditionalVAE(100, 6, cfg)
    clone = ConditionalVAE(model.input_len, model.cond_dim, model.cfg)
    clone.load_state_dict(model.state_dict())
    assert (model.input_len, model.cond_dim, model.cfg) == (100, 6, cfg)


def test_shape_validation() -> None:
    model = ConditionalVAE(100, 6, CVAEConfig(channels=(4, 8), latent_dim=3))
    with pytest.raises(ValueError):
        model(torch.randn(2, 99), torch.randn(2, 6))
    with pytest.raises(ValueError):
        model(torch.randn(2, 100), torch.randn(2, 5))
    with pytest.raises(ValueError):
        model(torch.randn(2, 100), torch.randn(3, 6))
    with pytest.raises(ValueError):
        model.decode(torch.randn(2, 4), torch.randn(2, 6))
    with pytest.raises(ValueError):
        model.sample(torch.randn(2, 7))


def test_sample_is_reproducible_with_generator() -> None:
    model = ConditionalVAE(200, 4, CVAEConfig(channels=(4, 8), latent_dim=3)).eval()
    cond = torch.randn(2, 4)
    a = model.sample(cond, generator=torch.Generator().manual_seed(7))
    b = model.sample(cond, generator=torch.Generator().manual_seed(7))
    c = model.sample(cond, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# ------------------------------------------------------------------------------------------------ loss


def test_loss_hand_computed() -> None:
    x_hat = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    x = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    mu = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    logvar = torch.tensor([[0.0, math.log(2.0)], [0.0, 0.0]])
    loss, recon, kld = cvae_loss(x_hat, x, mu, logvar, kld_weight=0.1)
    # Per-sample MSE: (1 + 4) / 2 = 2.5 and (4 + 9) / 2 = 6.5; batch mean 4.5.
    assert recon.item() == pytest.approx(4.5)
    # Sample 1: -0.5 * [(1 + 0 - 1 - 1) + (1 + ln2 - 0 - 2)] = 1 - ln2 / 2; sample 2: 0. Batch mean:
    expected_kld = (1.0 - math.log(2.0) / 2) / 2
    assert kld.item() == pytest.approx(expected_kld)
    assert loss.item() == pytest.approx(4.5 + 0.1 * expected_kld)


def test_loss_is_per_sample_not_cross_batch() -> None:
    """Each reconstruction is compared with its own target only (no [B, B, L] broadcast)."""
    x = torch.randn(3, 10)
    zeros = torch.zeros(3, 4)
    _, recon, kld = cvae_loss(x.clone(), x, zeros, zeros, kld_weight=1.0)
    assert recon.item() == 0.0
    assert kld.item() == 0.0


@pytest.mark.parametrize(
    ("x_hat_shape", "x_shape"),
    [((4, 10), (4, 1, 10)), ((4, 1, 10), (4, 10)), ((4, 10), (1, 10)), ((4, 10), (4, 9))],
)
def test_loss_rejects_shape_mismatch(x_hat_shape: tuple[int, ...], x_shape: tuple[int, ...]) -> None:
    zeros = torch.zeros(4, 3)
    with pytest.raises(ValueError):
        cvae_loss(torch.randn(x_hat_shape), torch.randn(x_shape), zeros, zeros, kld_weight=0.005)


# -------------------------------------------------------------------------------------------- training


def test_bounded_logvar_is_smooth_and_bounded():
    from icm_core.generator.cvae import LOGVAR_BOUND, bounded_logvar

    raw = torch.tensor([-1e4, -50.0, -1.0, 0.0, 0.5, 50.0, 1e4], requires_grad=True)
    out = bounded_logvar(raw)
    assert float(out.abs().max()) <= LOGVAR_BOUND
    assert torch.allclose(out[2:5], raw[2:5], atol=0.01)  # near identity where training lives
    out.sum().backward()
    assert bool((raw.grad[1:-1] > 0).all())  # a gradient even far out: the log-variance can come back


# ----------------------------------------------------------------------------------------- early stopping
