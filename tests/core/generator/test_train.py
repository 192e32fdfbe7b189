"""Tests of icm_core.generator.train: the CVAE's training loop, early stopping and resumable state."""

from __future__ import annotations

import math

import pytest
import torch

from icm_core.generator.config import CVAEConfig
from icm_core.generator.cvae import ConditionalVAE
from icm_core.generator.train import EarlyStopping, reconstruction_error, train_cvae


def test_overfits_a_single_checkpoint() -> None:
    """The p-diff family can fail to overfit one long vector (p-diff issue #27); this one must not."""
    gen = torch.Generator().manual_seed(11)
    x = _unit(torch.randn(1, 3000, generator=gen))
    cond = torch.randn(1, 16, generator=gen)
    # Depth 3 with 16 last channels keeps a bottleneck map of 376 x 16 values (> 3000), enough to store
    # an arbitrary vector; the paper's KL weight is kept.
    cfg = CVAEConfig(channels=(8, 16, 16), latent_dim=8, epochs=300, lr=3e-3, batch_size=1, kld_weight=0.005)
    model, history = train_cvae(x, cond, cfg)
    assert not model.training
    error = reconstruction_error(model, x, cond)
    assert error < 0.01, f"eval-mode reconstruction MSE {error:.5f} >= 0.01 (history tail {history[-1]})"


def test_multi_task_sampling_follows_the_condition() -> None:
    """One model, three tasks: z ~ N(0, I) under task k's condition decodes to task k's weights."""
    gen = torch.Generator().manual_seed(5)
    x = _unit(torch.randn(3, 3000, generator=gen))
    cond = torch.randn(3, 16, generator=gen)
    cond = cond / cond.norm(dim=1, keepdim=True)
    # A strong KL weight drives the posterior to the prior, so the decoder must read the task from the
    # condition and learns to ignore z: that is what makes prior sampling land on the right task.
    cfg = CVAEConfig(channels=(8, 16), latent_dim=4, epochs=300, lr=1e-2, batch_size=3, kld_weight=1.0)
    model, _ = train_cvae(x, cond, cfg)
    draws = torch.stack([model.sample(cond, generator=torch.Generator().manual_seed(s)) for s in range(5)])
    per_task = (draws - x).pow(2).mean(dim=2)  # [draws, tasks]
    assert per_task.max().item() < 0.05, per_task
    # And a task's condition does not produce another task's weights.
    swapped = (draws - x.roll(1, dims=0)).pow(2).mean(dim=2)
    assert swapped.min().item() > 1.0


def test_training_is_deterministic_and_scoped() -> None:
    gen = torch.Generator().manual_seed(3)
    x = _unit(torch.randn(5, 400, generator=gen))
    cond = torch.randn(5, 6, generator=gen)
    cfg = CVAEConfig(channels=(4, 8, 8), latent_dim=4, epochs=4, batch_size=2, input_noise=0.01)

    torch.manual_seed(99)
    before = torch.rand(3)
    torch.manual_seed(99)
    first, hist_a = train_cvae(x, cond, cfg)
    after = torch.rand(3)
    # train_cvae seeds inside a forked RNG, so the caller's random stream is untouched.
    assert torch.equal(before, after)

    second, hist_b = train_cvae(x, cond, cfg)
    state_a, state_b = first.state_dict(), second.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
    assert hist_a == hist_b

    other, _ = train_cvae(x, cond, cfg.model_copy(update={"seed": cfg.seed + 1}))
    assert not torch.equal(other.state_dict()["to_latent.weight"], state_a["to_latent.weight"])


def test_history_and_schedule() -> None:
    x = _unit(torch.randn(4, 300))
    cond = torch.randn(4, 3)
    cfg = CVAEConfig(channels=(4, 4), latent_dim=2, epochs=6, batch_size=2, lr=1e-3, lr_min=1e-5)
    seen: list[tuple[int, dict]] = []
    model, history = train_cvae(x, cond, cfg, on_epoch=lambda epoch, row: seen.append((epoch, row)))
    assert [epoch for epoch, _ in seen] == list(range(6))
    assert [row for _, row in seen] == history
    for row in history:
        assert set(row) == {"epoch", "loss", "recon", "kld", "lr"}
        assert row["loss"] == pytest.approx(row["recon"] + cfg.kld_weight * row["kld"], rel=1e-5)
    lrs = [row["lr"] for row in history]
    assert lrs == sorted(lrs, reverse=True)
    assert lrs[0] == pytest.approx(1e-3, rel=0.05)
    # 2 steps per epoch, 12 steps: the last step runs just above lr_min.
    assert lrs[-1] < 1e-4


def test_trailing_single_sample_batch_is_merged() -> None:
    """With 3 samples and batch 2, a naive split leaves a 1-sample batch; with a last feature map of
    length 1 that is a single value per channel, which BatchNorm cannot train on."""
    x = _unit(torch.randn(3, 16))
    cond = torch.randn(3, 2)
    cfg = CVAEConfig(channels=(2, 2, 2, 2), latent_dim=2, epochs=2, batch_size=2)
    model, history = train_cvae(x, cond, cfg)
    assert model.last_len == 1
    assert len(history) == 2


def test_single_untrainable_sample_is_rejected() -> None:
    cfg = CVAEConfig(channels=(2, 2, 2, 2), latent_dim=2, epochs=1, batch_size=2)
    with pytest.raises(ValueError, match="BatchNorm"):
        train_cvae(torch.randn(1, 16), torch.randn(1, 2), cfg)


def test_train_rejects_mismatched_inputs() -> None:
    cfg = CVAEConfig(channels=(2,), latent_dim=2, epochs=1)
    with pytest.raises(ValueError):
        train_cvae(torch.randn(3, 16), torch.randn(2, 2), cfg)
    with pytest.raises(ValueError):
        train_cvae(torch.randn(3, 16, 1), torch.randn(3, 2), cfg)


def test_reconstruction_error_restores_mode() -> None:
    model = ConditionalVAE(50, 3, CVAEConfig(channels=(2, 4), latent_dim=2)).train()
    x = torch.randn(5, 50)
    cond = torch.randn(5, 3)
    error = reconstruction_error(model, x, cond, batch_size=2)
    assert model.training
    model.eval()
    x_hat, _, _ = model(x, cond)
    assert error == pytest.approx((x_hat - x).pow(2).mean().item(), rel=1e-5)


@pytest.mark.slow
def test_shallow_wide_cvae_trains_without_overflow():
    """The depth-4-rank-8 ablation case: 4 conv layers over 122,880 weights leave 61,440 features for to_latent;
    its log-variance used to jump past exp's range in the first epoch (loss inf). It must stay finite now."""
    from icm_core.generator.cvae import LOGVAR_BOUND
    from icm_core.generator.train import train_cvae

    g = torch.Generator().manual_seed(0)
    length = 8 * 2 * (8 * 576 + 576 * 8) - 8 * (576 - 192) * 8  # 8 layers x (q_proj + v_proj) at rank 8
    assert length == 122_880
    weights = torch.randn(8, length, generator=g) * torch.linspace(0.2, 3.0, length)
    conds = torch.randn(8, 16, generator=g)
    cfg = CVAEConfig(channels=(8, 16, 16, 8), epochs=2, batch_size=4)
    model, history = train_cvae(weights, conds, cfg)
    assert model.to_latent.in_features == 61_440
    assert all(math.isfinite(row[k]) for row in history for k in ("loss", "recon", "kld"))
    # Bounded: at most latent_dim * (exp(B) - 1 - B) / 2 plus the mu term; unbounded it reached 1e9+ here.
    assert history[-1]["kld"] < 1e6
    _, logvar = model.encode(weights[:2], conds[:2])
    assert float(logvar.abs().max()) <= LOGVAR_BOUND


def test_early_stopping_keeps_the_best_validated_weights() -> None:
    """A validation score that bottoms out at the 2nd check stops training `patience` checks later, and the
    returned model is the one scored best (the weights of that epoch, BatchNorm recalibrated)."""
    x = _unit(torch.randn(4, 300))
    cond = torch.randn(4, 3)
    cfg = CVAEConfig(channels=(4, 4), latent_dim=2, epochs=40, batch_size=2, val_every=2, patience=2)
    scores = iter([5.0, 1.0, 3.0, 4.0, 0.5, 0.1])  # best at the 2nd check (epoch index 3), then worse twice
    kept: dict[str, torch.Tensor] = {}

    def validate(model: ConditionalVAE) -> float:
        assert not model.training  # scored as generation runs: eval mode
        score = next(scores)
        if score == 1.0:
            kept.update({k: v.clone() for k, v in model.state_dict().items() if "running" not in k})
        return score

    model, history = train_cvae(x, cond, cfg, validate=validate)
    assert len(history) == 8  # 4 checks (epochs 2, 4, 6, 8), stopped after the 2nd bad one
    assert [row["epoch"] for row in history if "val" in row] == [1, 3, 5, 7]
    assert [row["epoch"] for row in history if row.get("best")] == [3]
    for key, value in kept.items():
        if "num_batches" not in key:
            assert torch.equal(model.state_dict()[key], value), key


def test_early_stopping_replays_a_recorded_curve_without_weights() -> None:
    """The rule the training loop uses, followed on scores alone (scripts/budget_curves.py replays a curve
    recorded without stopping): checks fall on multiples of ``every`` and the last epoch; it stops after
    ``patience`` checks without an improvement of ``min_delta`` and names the best epoch."""
    stopper = EarlyStopping(every=5, patience=2, min_delta=0.01)
    curve = {5: 3.35, 10: 3.31, 15: 3.305, 20: 3.309, 25: 3.2}  # 15 and 20 improve by less than min_delta
    seen = []
    for epoch in range(1, 31):
        if stopper.due(epoch, 30) and not stopper.stopped:
            stopper.observe(epoch, curve.get(epoch, 9.0))
            seen.append(epoch)
    assert seen == [5, 10, 15, 20] and stopper.stopped
    assert (stopper.best_epoch, stopper.best, stopper.best_weights) == (10, 3.31, None)
    assert EarlyStopping(every=5, patience=2, min_delta=0).due(7, 7)  # the last epoch is always checked
    with pytest.raises(FloatingPointError, match="epoch 3"):
        stopper.observe(3, math.nan)


def test_validation_does_not_change_training() -> None:
    """Validating draws no global random numbers: with a patience that never triggers, the weights equal those of
    a run without validation."""
    x = _unit(torch.randn(4, 300))
    cond = torch.randn(4, 3)
    cfg = CVAEConfig(channels=(4, 4), latent_dim=2, epochs=6, batch_size=2, val_every=1, patience=100)
    falling = iter(range(100, 0, -1))
    with_val, hist = train_cvae(x, cond, cfg, validate=lambda m: float(next(falling)))
    without, _ = train_cvae(x, cond, cfg)
    assert len(hist) == 6 and hist[-1].get("best")
    for key, value in without.state_dict().items():
        assert torch.equal(with_val.state_dict()[key], value), key


def test_early_stopping_state_survives_a_resume(tmp_path) -> None:
    """A run killed after the best check resumes to the same stop epoch and the same kept weights."""
    from icm_core.infra.resume import Resumer

    x = _unit(torch.randn(4, 300))
    cond = torch.randn(4, 3)
    cfg = CVAEConfig(channels=(4, 4), latent_dim=2, epochs=30, batch_size=2, val_every=2, patience=2)

    def scorer():
        values = iter([3.0, 1.0, 2.0, 2.0, 2.0, 2.0])
        return lambda model: next(values)

    full, hist_full = train_cvae(x, cond, cfg, validate=scorer())

    class Killed(Exception):
        pass

    def kill_at(epoch: int, row: dict) -> None:
        if epoch == 4:
            raise Killed

    resumer = Resumer(tmp_path / "state", {"epochs": 2})
    values = iter([3.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    with pytest.raises(Killed):
        train_cvae(x, cond, cfg, resume=resumer, validate=lambda m: next(values), on_epoch=kill_at)
    # The saved state is after epoch 4 (two checks: 3.0 then the best 1.0); the rest of the scores follow.
    rest = iter([2.0, 2.0])
    resumed, hist_resumed = train_cvae(x, cond, cfg, resume=resumer, validate=lambda m: next(rest))
    assert hist_resumed == hist_full
    for key, value in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def _unit(x: torch.Tensor) -> torch.Tensor:
    """Z-score each row, as the pipeline normalises LoRA weights."""
    return (x - x.mean(dim=1, keepdim=True)) / x.std(dim=1, keepdim=True)
