"""COND P-DIFF baseline: noise schedule, shapes of the autoencoder / denoiser / sampler, normalisation,
determinism and the self-contained artifact."""

from __future__ import annotations

import math

import pytest
import torch

from icm_core.baselines.config import PDiffConfig
from icm_core.baselines.pdiff import SharedNorm, TaskNorm, load_pdiff, save_pdiff, train_pdiff
from icm_core.baselines.pdiff_networks import ConditionalUNet1d, FoldingAutoencoder, NoiseSchedule, ae_padded_length
from icm_core.generator.config import SampleConfig
from icm_core.generator.dataset import build_dataset
from icm_core.infra.io import ArtifactError, save_tensors
from icm_core.lora.flatten import flatten_lora, lora_layout


TINY = PDiffConfig(
    fold_rate=3,
    ae_kernel_size=3,
    ae_enc_channels=(2, 2),
    ae_dec_channels=(2, 8),
    ae_epochs=40,
    ae_lr=3e-3,
    unet_channels=(8, 16),
    cond_tokens=2,
    timesteps=50,
    ddpm_steps=30,
    batch_size=8,
    log_every=10,
)


def test_default_schedule_matches_the_public_code():
    cfg = PDiffConfig()
    schedule = NoiseSchedule.linear(cfg.timesteps, cfg.beta_start, cfg.beta_end)
    assert schedule.timesteps == 1000
    assert float(schedule.betas[0]) == pytest.approx(1e-4) and float(schedule.betas[-1]) == pytest.approx(2e-2)
    diffs = schedule.betas[1:] - schedule.betas[:-1]
    assert torch.allclose(diffs, diffs[0].expand_as(diffs))  # linear
    assert bool((schedule.alpha_bars[1:] < schedule.alpha_bars[:-1]).all())
    assert float(schedule.alpha_bars[-1]) == pytest.approx(math.prod(1 - float(b) for b in schedule.betas), rel=1e-9)
    assert float(schedule.alpha_bars[-1]) < 1e-4  # x_T is essentially pure noise
    variance = schedule.posterior_variance()
    assert float(variance[0]) == 0.0 and bool((variance[1:] <= schedule.betas[1:]).all())


def test_add_noise_interpolates_signal_and_noise():
    schedule = NoiseSchedule.linear(1000, 1e-4, 2e-2)
    x0, noise = torch.ones(2, 3, 4), torch.zeros(2, 3, 4)
    xt = schedule.add_noise(x0, noise, torch.tensor([0, 999]))
    assert float(xt[0].mean()) == pytest.approx(math.sqrt(1 - 1e-4), rel=1e-5)
    assert float(xt[1].mean()) == pytest.approx(float(schedule.alpha_bars[999].sqrt()), rel=1e-4)


def test_autoencoder_shapes():
    cfg = PDiffConfig()
    assert ae_padded_length(30720, 5, 4) == 31250
    ae = FoldingAutoencoder(1000, TINY)
    assert ae.padded_len % 9 == 0 and ae.padded_len >= 1000
    x = torch.randn(3, 1000)
    with torch.no_grad():
        latent = ae.encode(x)
    assert latent.shape == (3, *ae.latent_shape) == (3, 2, ae.padded_len // 9)
    assert float(latent.abs().max()) <= 1.0  # tanh latent
    assert ae.decode(latent).shape == (3, 1000) and ae(x).shape == (3, 1000)
    assert FoldingAutoencoder(30720, cfg).latent_shape == (4, 50)
    with pytest.raises(ValueError, match="expected"):
        ae.encode(torch.randn(3, 999))


def test_denoiser_shapes_and_condition_checks():
    unet = ConditionalUNet1d((2, 13), cond_dim=6, cfg=TINY)
    eps = unet(torch.randn(4, 2, 13), torch.tensor([0, 1, 2, 49]), torch.randn(4, 6))
    assert eps.shape == (4, 2, 13)
    with pytest.raises(ValueError, match="condition"):
        unet(torch.randn(4, 2, 13), torch.zeros(4, dtype=torch.long), torch.randn(4, 5))
    with pytest.raises(ValueError, match="latent shape"):
        unet(torch.randn(4, 2, 12), torch.zeros(4, dtype=torch.long), torch.randn(4, 6))


def test_config_is_validated():
    with pytest.raises(ValueError, match="ae_dec_channels"):
        PDiffConfig(ae_enc_channels=(4, 4), ae_dec_channels=(4, 8, 8))
    with pytest.raises(ValueError, match="beta_end"):
        PDiffConfig(beta_start=0.1, beta_end=0.01)


def lora_state(seed: int, shift: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "m.layers.0.q.lora_A.weight": torch.randn(2, 40, generator=g) * 0.1 + shift,
        "m.layers.0.q.lora_B.weight": torch.randn(30, 2, generator=g) * 0.1 - shift,
    }


@pytest.fixture(scope="module")
def dataset():
    checkpoints = {
        "alpha": [lora_state(i, 0.5) for i in range(4)],
        "beta": [lora_state(10 + i, -0.5) for i in range(4)],
    }
    vectors = {"alpha": torch.tensor([1.0, 0.0, 0.5]), "beta": torch.tensor([0.0, 1.0, -0.5])}
    return build_dataset(checkpoints, vectors)


@pytest.fixture(scope="module")
def trained(dataset):
    model, history, seconds = train_pdiff(dataset, TINY, {"r": 2, "lora_alpha": 8})
    return model, history, seconds


def test_task_norm_is_per_task_per_coordinate(dataset):
    norm = TaskNorm.fit(dataset.weights, dataset.row_category, 1e-8)
    assert norm.names == ("alpha", "beta") and norm.mean.shape == (2, dataset.layout.total)
    z = norm.normalize(dataset.weights, dataset.row_category)
    for name in norm.names:
        rows = z[[i for i, o in enumerate(dataset.row_category) if o == name]]
        assert torch.allclose(rows.mean(0), torch.zeros(rows.shape[1]), atol=1e-5)
        assert torch.allclose(rows.std(0, unbiased=False), torch.ones(rows.shape[1]), atol=1e-4)
    assert torch.allclose(norm.denormalize(z[0], "alpha"), dataset.weights[0], atol=1e-5)
    with pytest.raises(KeyError, match="gamma"):
        norm.denormalize(z[0], "gamma")


def test_training_history_and_learning(trained):
    _, history, seconds = trained
    ae = [row["recon"] for row in history["autoencoder"]]
    assert len(ae) == TINY.ae_epochs and ae[-1] < ae[0]
    assert [row["step"] for row in history["ddpm"]] == [10, 20, 30]
    assert all(math.isfinite(row["loss"]) for row in history["ddpm"]) and seconds > 0


def test_sampling_gives_a_state_dict_of_the_layout(trained, dataset):
    model, _, _ = trained
    state = model.generate_for("alpha", SampleConfig(seed=3))
    assert lora_layout(state) == dataset.layout
    again = model.generate_for("alpha", SampleConfig(seed=3))
    assert all(torch.equal(state[k], again[k]) for k in state)
    other = model.generate_for("alpha", SampleConfig(seed=4))
    assert any(not torch.equal(state[k], other[k]) for k in state)
    # Per-task de-normalisation: each category's sample sits near its own checkpoints.
    flat_alpha = flatten_lora(state, dataset.layout)[0]
    flat_beta = flatten_lora(model.generate_for("beta", SampleConfig(seed=3)), dataset.layout)[0]
    mean_alpha, mean_beta = dataset.weights[:4].mean(0), dataset.weights[4:].mean(0)
    assert (flat_alpha - mean_alpha).norm() < (flat_alpha - mean_beta).norm()
    assert (flat_beta - mean_beta).norm() < (flat_beta - mean_alpha).norm()
    with pytest.raises(KeyError, match="gamma"):
        model.generate_for("gamma")


def test_batched_sampling_matches_one_category_at_a_time(trained):
    """The demo samples all categories (and draws) in one batch; each category's adapter must be the one a
    one-category run gives: its own noise stream, nothing leaking between rows of the batch."""
    model, _, _ = trained
    cfg = SampleConfig(seed=5, num_draws=2)
    together = model.generate(["beta", "alpha"], cfg)
    assert list(together) == ["beta", "alpha"]
    for name in ("alpha", "beta"):
        alone = model.generate_for(name, cfg)
        assert all(torch.allclose(together[name][k], alone[k], atol=1e-5, rtol=1e-4) for k in alone), name
    # Two draws are averaged: the result is not the first draw alone.
    first = model.generate_for("alpha", SampleConfig(seed=5))
    assert any(not torch.allclose(together["alpha"][k], first[k], atol=1e-5) for k in first)
    with pytest.raises(KeyError, match="gamma"):
        model.generate(["alpha", "gamma"])
    with pytest.raises(ValueError, match="one seed per row"):
        model.sample_latents(model.task_vectors["alpha"].reshape(1, -1), [1, 2])


def test_training_is_deterministic(dataset, trained):
    model, history, _ = trained
    again, history2, _ = train_pdiff(dataset, TINY, {"r": 2, "lora_alpha": 8})
    assert history == history2
    for (k, v), (k2, v2) in zip(model.denoiser.state_dict().items(), again.denoiser.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)


def test_artifact_round_trip_is_self_contained(trained, tmp_path):
    model, history, _ = trained
    path = tmp_path / "pdiff.safetensors"
    save_pdiff(path, model, {"history": history})
    loaded = load_pdiff(path)
    a, b = model.generate_for("beta", SampleConfig(seed=1)), loaded.generate_for("beta", SampleConfig(seed=1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.meta["categories"] == ["alpha", "beta"] and loaded.adapter_config == {"r": 2, "lora_alpha": 8}
    other = tmp_path / "other.safetensors"
    save_tensors(other, {"x": torch.zeros(1)}, {"kind": "something-else"})
    with pytest.raises(ArtifactError, match="not a COND P-DIFF"):
        load_pdiff(other)


SHARED = TINY.model_copy(update={"normalization": "shared"})


@pytest.fixture(scope="module")
def trained_shared(dataset):
    model, history, _ = train_pdiff(dataset, SHARED, {"r": 2, "lora_alpha": 8})
    return model, history


def test_shared_normalisation_stores_no_per_task_statistics(dataset, trained_shared, tmp_path):
    """normalization='shared': one per-tensor z-score over all tasks (as ICM-LoRA); the artifact holds no
    per-task mean, and de-normalising a zero output gives the same weights for every task."""
    model, history = trained_shared
    norm = model.norm
    assert isinstance(norm, SharedNorm) and norm.stats.mean.shape == (len(dataset.layout.specs),)
    zero = torch.zeros(dataset.layout.total)
    assert torch.equal(norm.denormalize(zero, "alpha"), norm.denormalize(zero, "beta"))
    z = norm.normalize(dataset.weights, dataset.row_category)
    for spec in dataset.layout.specs:  # every tensor z-scored over all checkpoints of all tasks
        block = z[:, spec.offset : spec.offset + spec.numel].double()
        assert abs(float(block.mean())) < 1e-5 and abs(float(block.std(unbiased=False)) - 1) < 1e-4
    assert torch.allclose(norm.denormalize(z[0], "alpha"), dataset.weights[0], atol=1e-5)
    with pytest.raises(KeyError, match="gamma"):
        norm.denormalize(zero, "gamma")
    # The per-task variant's stored mean is each task's mean checkpoint: decoding zero gives it back.
    per_task = TaskNorm.fit(dataset.weights, dataset.row_category, 1e-8)
    assert torch.allclose(per_task.denormalize(zero, "alpha"), dataset.weights[:4].mean(0), atol=1e-6)
    path = tmp_path / "shared.safetensors"
    save_pdiff(path, model, {"history": history})
    loaded = load_pdiff(path)
    assert isinstance(loaded.norm, SharedNorm)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert tuple(f.get_tensor("norm.mean").shape) == (len(dataset.layout.specs),)  # no [tasks, L] rows
    a, b = model.generate_for("beta", SampleConfig(seed=1)), loaded.generate_for("beta", SampleConfig(seed=1))
    assert all(torch.equal(a[k], b[k]) for k in a)
