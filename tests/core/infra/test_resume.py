"""Resumable state inside the long training loops (icm_core/infra/resume.py): a run interrupted after a saved state
and continued from it ends bit-identical to an uninterrupted run, for LoRA, the CVAE and COND P-DIFF.

The interruption here is an exception raised from the loop's progress callback (an in-process stand-in for a
kill; tests/flows/test_resume_inside.py kills real pipeline processes with SIGKILL)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from icm_core.baselines.pdiff import train_pdiff
from icm_core.generator.config import CVAEConfig
from icm_core.generator.dataset import build_dataset
from icm_core.generator.train import train_cvae
from icm_core.infra.io import save_tensors, sidecar_path
from icm_core.infra.resume import Resumer
from icm_core.lora.train import train_lora
from tests import helpers
from tests.flows.support import TINY_PDIFF


class Interrupted(Exception):
    pass


def interrupt_at(n: int):
    def callback(step, *_):
        if step == n:
            raise Interrupted(step)

    return callback


def folder_hashes(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("last_n_layers", [None, 1], ids=["all-layers", "frozen-prefix-reused"])
def test_lora_resumes_bit_identical(tmp_path, tiny_model_cfg, last_n_layers):
    from icm_core.models.base_model import load_base_model

    cfg = helpers.lora_config(
        steps=12, checkpoint_every=2, trajectory_size=3, dropout=0.1, warmup_steps=2, last_n_layers=last_n_layers
    )
    blocks = helpers.char_blocks(helpers.SAMPLE_TEXT, 24)
    assert cfg.steps * cfg.batch_size > blocks.shape[0]  # blocks repeat: with last_n_layers=1 the prefix is reused
    reference = tmp_path / "reference"
    train_lora(load_base_model(tiny_model_cfg), blocks, cfg, reference, "tiny")

    out, state = tmp_path / "resumed", Resumer(tmp_path / "state", {"steps": 4})
    with pytest.raises(Interrupted):  # killed after step 10: the last state is step 8 (with checkpoint 8)
        train_lora(load_base_model(tiny_model_cfg), blocks, cfg, out, "tiny", on_step=interrupt_at(10), resume=state)
    assert state.latest_label() == "step 8"
    shutil.rmtree(out)  # the output folder is reset before a build starts again
    seen = []
    train_lora(
        load_base_model(tiny_model_cfg), blocks, cfg, out, "tiny", on_step=lambda s, _: seen.append(s), resume=state
    )
    assert seen == [9, 10, 11, 12]  # continued, not restarted
    assert folder_hashes(out) == folder_hashes(reference)


def test_lora_saving_state_does_not_change_the_result(tmp_path, tiny_model_cfg):
    from icm_core.models.base_model import load_base_model

    cfg = helpers.lora_config(steps=6, checkpoint_every=1, trajectory_size=2)
    blocks = helpers.char_blocks(helpers.SAMPLE_TEXT, 24)
    train_lora(load_base_model(tiny_model_cfg), blocks, cfg, tmp_path / "a", "tiny")
    train_lora(
        load_base_model(tiny_model_cfg),
        blocks,
        cfg,
        tmp_path / "b",
        "tiny",
        resume=Resumer(tmp_path / "s", {"steps": 1}),
    )
    assert folder_hashes(tmp_path / "a") == folder_hashes(tmp_path / "b")
    assert [p.name for p in Resumer(tmp_path / "s").states()] == ["state-000000005.safetensors"]  # older ones gone


def test_cvae_resumes_bit_identical(tmp_path):
    torch.manual_seed(0)
    weights, conds = torch.randn(10, 100), torch.randn(10, 4)
    cfg = CVAEConfig(channels=(4, 8, 8, 4), latent_dim=8, epochs=7, batch_size=3, input_noise=0.01)
    reference, history = train_cvae(weights, conds, cfg)
    state = Resumer(tmp_path / "state", {"epochs": 2})
    with pytest.raises(Interrupted):
        train_cvae(weights, conds, cfg, on_epoch=interrupt_at(4), resume=state)  # after epoch 5 (0-based 4)
    assert state.latest_label() == "epoch 4"
    epochs = []
    model, resumed_history = train_cvae(weights, conds, cfg, on_epoch=lambda e, _: epochs.append(e), resume=state)
    assert epochs == [4, 5, 6]
    assert same_weights(model, reference)  # BatchNorm statistics included
    assert resumed_history == history


@pytest.mark.parametrize("stop", [("autoencoder", 2), ("ddpm", 5)])
def test_pdiff_resumes_bit_identical(tmp_path, stop):
    g = torch.Generator().manual_seed(0)
    checkpoints = {
        n: [
            {"m.lora_A.weight": torch.randn(2, 8, generator=g), "m.lora_B.weight": torch.randn(8, 2, generator=g)}
            for _ in range(3)
        ]
        for n in ("x", "y")
    }
    dataset = build_dataset(checkpoints, {"x": torch.randn(4, generator=g), "y": torch.randn(4, generator=g)})
    cfg = TINY_PDIFF.model_copy(update={"ae_epochs": 4, "ddpm_steps": 6, "log_every": 1})
    reference, history, _ = train_pdiff(dataset, cfg, {})

    def progress(phase, step, loss):
        if (phase, step) == stop:
            raise Interrupted(stop)

    state = Resumer(tmp_path / "state", {"ae_epochs": 1, "ddpm_steps": 2})
    with pytest.raises(Interrupted):
        train_pdiff(dataset, cfg, {}, on_progress=progress, resume=state)
    assert state.latest_label() == {"autoencoder": "autoencoder epoch 3", "ddpm": "ddpm step 4"}[stop[0]]
    model, resumed_history, _ = train_pdiff(dataset, cfg, {}, resume=state)
    assert same_weights(model.autoencoder, reference.autoencoder)
    assert same_weights(model.denoiser, reference.denoiser)
    assert resumed_history == history


def test_damaged_state_is_ignored(tmp_path):
    state = Resumer(tmp_path / "state", {"steps": 1})
    path = state.save(3, {"x": torch.ones(2)}, {"label": "step 3"})
    save_tensors(tmp_path / "state" / "state-000000004.safetensors", {"x": torch.ones(2)}, {"step": 4})
    (tmp_path / "state" / "state-000000004.safetensors").write_bytes(b"torn")  # a kill while writing step 4
    loaded = state.load()
    assert loaded is not None and loaded.step == 3 and path.is_file() and sidecar_path(path).is_file()
    state.clear()
    assert state.load() is None and not (tmp_path / "state").exists()
