"""Tests of icm_core.lora.train on the tiny model: trajectories, PEFT adapter folders, determinism."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from icm_core.infra.io import ArtifactError, load_tensors, sha256_file, sidecar_path
from icm_core.lora.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_sha256, read_adapter
from icm_core.lora.train import checkpoint_steps, lr_at, train_lora
from icm_core.lora.trajectory import TRAJECTORY_INDEX, load_trajectory_checkpoints, read_trajectory
from tests import helpers


# steps 10, every 2, keep 2 -> checkpoints at 8 and 10: "10" sorts before "8" as a plain string.
CFG = helpers.lora_config(steps=10, checkpoint_every=2, trajectory_size=2, dropout=0.05, warmup_steps=2)


@pytest.fixture(scope="module")
def blocks():
    return helpers.char_blocks(helpers.SAMPLE_TEXT, 24)


@pytest.fixture(scope="module")
def tiny_base_id(tiny_base_dir):
    return str(tiny_base_dir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_cfg, blocks):
    """The same seeded training twice, each on a freshly loaded base model."""
    from icm_core.models.base_model import load_base_model

    out = []
    for i in range(2):
        folder = tmp_path_factory.mktemp(f"lora-run{i}")
        steps_seen = []
        trajectory = train_lora(
            load_base_model(tiny_model_cfg),
            blocks,
            CFG,
            folder,
            tiny_model_cfg.name_or_path,
            on_step=lambda step, loss, seen=steps_seen: seen.append((step, loss)),
        )
        out.append((trajectory, steps_seen))
    return out


def test_checkpoint_steps_and_lr():
    assert checkpoint_steps(CFG) == [8, 10]
    assert checkpoint_steps(helpers.lora_config(steps=60, checkpoint_every=2, trajectory_size=10)) == list(
        range(42, 61, 2)
    )
    assert checkpoint_steps(helpers.lora_config(steps=5, checkpoint_every=1, trajectory_size=5)) == [1, 2, 3, 4, 5]
    cfg = helpers.lora_config(lr=1.0, warmup_steps=4, steps=13, final_lr_ratio=0.1)
    # Linear warmup, then cosine decay from lr at the first step after warmup to lr * ratio at the last step.
    assert [lr_at(s, cfg) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_at(12, cfg) == pytest.approx(0.1)
    assert lr_at(8, cfg) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    decay = [lr_at(s, cfg) for s in range(4, 13)]
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False))
    assert lr_at(0, helpers.lora_config(lr=0.5, warmup_steps=0)) == 0.5


def test_trajectory_files(runs):
    trajectory, seen = runs[0][0], runs[0][1]
    folder = trajectory.folder
    assert trajectory.steps == [8, 10]
    assert trajectory.files == ["checkpoint-000008.safetensors", "checkpoint-000010.safetensors"]
    assert sorted(trajectory.files) == trajectory.files  # zero-padded: string order is step order
    assert [s for s, _ in seen] == list(range(1, 11))
    assert trajectory.losses == [loss for _, loss in seen]
    for name, digest, step in zip(trajectory.files, trajectory.sha256, trajectory.steps, strict=True):
        path = folder / name
        assert path.is_file()
        sidecar = json.loads(sidecar_path(path).read_text())
        assert sidecar["sha256"] == digest == sha256_file(path)
        assert sidecar["meta"]["step"] == step
        assert sidecar["meta"]["loss"] == pytest.approx(trajectory.losses[step - 1])
    index = json.loads((folder / TRAJECTORY_INDEX).read_text())
    assert index["steps"] == [8, 10]
    assert index["config"]["steps"] == 10
    assert (folder / "adapter" / ADAPTER_CONFIG).is_file() and (folder / "adapter" / ADAPTER_WEIGHTS).is_file()
    assert not [p for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".")]


def test_checkpoint_keys_match_adapter_config(runs, tiny_base_id):
    trajectory = runs[0][0]
    checkpoints = load_trajectory_checkpoints(trajectory.folder)
    assert len(checkpoints) == 2
    keys = sorted(checkpoints[0])
    assert keys == sorted(checkpoints[1])
    # 2 layers x (q, v) x (A, B)
    assert len(keys) == 8
    for key in keys:
        tensor = checkpoints[0][key]
        assert tensor.dtype == torch.float32
        assert 2 in tensor.shape  # rank
    config = trajectory.adapter_config
    assert config["r"] == 2 and config["peft_type"] == "LORA"
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert config["base_model_name_or_path"] == tiny_base_id
    # The trajectory moved: the two checkpoints differ.
    assert any(not torch.equal(checkpoints[0][k], checkpoints[1][k]) for k in keys)


def test_read_trajectory_orders_numerically(runs, tmp_path):
    import shutil

    folder = tmp_path / "traj"
    shutil.copytree(runs[0][0].folder, folder)
    index_path = folder / TRAJECTORY_INDEX
    index = json.loads(index_path.read_text())
    # Shuffle the index (10 listed before 8, as a string sort would do).
    for field in ("steps", "files", "sha256"):
        index[field] = list(reversed(index[field]))
    index_path.write_text(json.dumps(index))
    trajectory = read_trajectory(folder)
    assert trajectory.steps == [8, 10]
    assert trajectory.files == ["checkpoint-000008.safetensors", "checkpoint-000010.safetensors"]
    assert trajectory.sha256 == runs[0][0].sha256
    loaded = load_trajectory_checkpoints(folder)
    original = load_trajectory_checkpoints(runs[0][0].folder)
    for a, b in zip(loaded, original, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_corrupted_checkpoint_is_refused(runs, tmp_path):
    import shutil

    folder = tmp_path / "traj"
    shutil.copytree(runs[0][0].folder, folder)
    path = folder / runs[0][0].files[0]
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checkpoint-000008"):
        load_trajectory_checkpoints(folder)


def test_adapter_folder_loads_with_peft_and_equals_last_checkpoint(runs, fresh_base):
    from peft import PeftModel, get_peft_model_state_dict

    trajectory = runs[0][0]
    last, _ = load_tensors(trajectory.folder / trajectory.files[-1])
    on_disk = load_file(str(trajectory.adapter_dir / ADAPTER_WEIGHTS))
    assert set(on_disk) == set(last)
    assert all(torch.equal(on_disk[k], last[k]) for k in last)

    model = PeftModel.from_pretrained(fresh_base(), str(trajectory.adapter_dir))
    loaded = get_peft_model_state_dict(model)
    assert set(loaded) == set(last)
    assert all(torch.equal(loaded[k].float(), last[k]) for k in last)

    weights, config = read_adapter(trajectory.adapter_dir)
    assert config == trajectory.adapter_config
    assert set(weights) == set(last)


def test_adapter_changes_the_model(runs, fresh_base, blocks):
    from icm_core.lora.adapters import load_adapter, merge_adapter

    trajectory = runs[0][0]
    base = fresh_base()
    with torch.no_grad():
        base_logits = base(input_ids=blocks[:1]).logits
        peft_logits = load_adapter(fresh_base(), trajectory.adapter_dir).eval()(input_ids=blocks[:1]).logits
        merged_logits = merge_adapter(fresh_base(), trajectory.adapter_dir).eval()(input_ids=blocks[:1]).logits
    assert not torch.allclose(base_logits, peft_logits)
    assert torch.allclose(peft_logits, merged_logits, atol=1e-4)


def test_adapter_for_another_base_is_refused(runs, fresh_base):
    from icm_core.lora.adapters import load_adapter

    with pytest.raises(ValueError, match="made for base model"):
        load_adapter(fresh_base(), runs[0][0].adapter_dir, base_model_id="some/other-model")


def test_seeded_runs_are_identical(runs):
    (first, seen_a), (second, seen_b) = runs
    assert first.sha256 == second.sha256
    assert seen_a == seen_b
    assert adapter_sha256(first.adapter_dir) == adapter_sha256(second.adapter_dir)
    pairs = zip(load_trajectory_checkpoints(first.folder), load_trajectory_checkpoints(second.folder), strict=True)
    for a, b in pairs:
        assert set(a) == set(b)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_other_seed_gives_other_weights(runs, fresh_base, blocks, tmp_path):
    cfg = CFG.model_copy(update={"seed": 1})
    other = train_lora(fresh_base(), blocks, cfg, tmp_path / "seed1", "tiny")
    assert other.sha256 != runs[0][0].sha256


def test_loss_decreases_on_repeated_data(fresh_base, tmp_path):
    blocks = helpers.char_blocks(helpers.SAMPLE_TEXT, 32)[:4]
    cfg = helpers.lora_config(
        steps=30, lr=3e-2, batch_size=4, trajectory_size=1, checkpoint_every=1, dropout=0.0, warmup_steps=0
    )
    trajectory = train_lora(fresh_base(), blocks, cfg, tmp_path / "fit", "tiny")
    losses = trajectory.losses
    assert len(losses) == 30
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5
    assert trajectory.steps == [30]


def test_bad_blocks_are_refused(fresh_base, tmp_path):
    with pytest.raises(ValueError, match=r"\[N, T\]"):
        train_lora(fresh_base(), torch.zeros(0, 8, dtype=torch.long), CFG, tmp_path / "x", "tiny")
    with pytest.raises(ValueError, match=r"\[N, T\]"):
        train_lora(fresh_base(), torch.zeros(8, dtype=torch.long), CFG, tmp_path / "y", "tiny")


def test_reused_frozen_prefix_equals_the_whole_forward(fresh_base, tmp_path):
    """Blocks seen more than once and adapters only in the last layer: layer 0 runs once per block, and the losses
    and weights equal those of the run that runs the whole model every step, to float rounding."""
    from icm_core.models.prefix import decoder_stack

    blocks = helpers.char_blocks(helpers.SAMPLE_TEXT, 24)[:6]
    cfg = helpers.lora_config(steps=9, batch_size=2, last_n_layers=1, dropout=0.1, trajectory_size=2)
    runs = {}
    for reuse in (False, True):
        base = fresh_base()
        calls: list[int] = []
        decoder_stack(base).layers[0].register_forward_pre_hook(lambda *a, calls=calls: calls.append(1))
        runs[reuse] = (train_lora(base, blocks, cfg, tmp_path / str(reuse), "tiny", reuse_prefix=reuse), calls)
    (whole, whole_calls), (reused, reused_calls) = runs[False], runs[True]
    assert len(whole_calls) == 9 and len(reused_calls) == 3  # every step vs once per block (3 batches of 2)
    assert reused.losses == pytest.approx(whole.losses, rel=1e-5, abs=1e-6)
    pairs = zip(load_trajectory_checkpoints(whole.folder), load_trajectory_checkpoints(reused.folder), strict=True)
    for a, b in pairs:
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


def test_one_pass_over_the_blocks_runs_the_whole_model(fresh_base, tmp_path):
    from icm_core.models.prefix import decoder_stack

    blocks = helpers.char_blocks(helpers.SAMPLE_TEXT, 24)[:6]
    base = fresh_base()
    calls: list[int] = []
    decoder_stack(base).layers[0].register_forward_pre_hook(lambda *a: calls.append(1))
    cfg = helpers.lora_config(steps=3, batch_size=2, last_n_layers=1, trajectory_size=1)
    train_lora(base, blocks, cfg, tmp_path / "once", "tiny")
    assert len(calls) == 3  # nothing repeats: no prefix pass, every step runs layer 0 itself
