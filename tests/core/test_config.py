"""Tests of icm_core.config (and the category-name check that icm_core.infra.layout relies on)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from icm_core.config import CONFIG_ENV, RunConfig, load_run_config
from icm_core.data.config import DataConfig
from icm_core.generator.config import CVAEConfig
from icm_core.lora.config import LoraTrainConfig
from icm_core.models.config import ModelConfig
from icm_core.zeroshot.config import ZeroShotRunConfig


def test_defaults_are_valid():
    cfg = RunConfig()
    assert cfg.lora.rank == 2 and cfg.cvae.depth == 12
    assert load_run_config() == cfg


@pytest.mark.parametrize(
    "model, data",
    [
        (LoraTrainConfig, {"bogus": 1}),
        (CVAEConfig, {"latent": 3}),
        (RunConfig, {"lora_cfg": {}}),
    ],
)
def test_unknown_field_is_named(model, data):
    with pytest.raises(ValidationError) as info:
        model(**data)
    assert next(iter(data)) in str(info.value)


def test_unknown_field_in_file_is_named(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lora:\n  steps: 10\n  trajectory_size: 2\n  stepz: 3\n")
    with pytest.raises(ValueError) as info:
        load_run_config(path)
    assert "lora.stepz" in str(info.value)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "model, data",
    [
        (LoraTrainConfig, {"rank": 0}),
        (LoraTrainConfig, {"dropout": 1.0}),
        (LoraTrainConfig, {"lr": 0}),
        (LoraTrainConfig, {"target_modules": ()}),
        (LoraTrainConfig, {"steps": 10, "trajectory_size": 6, "checkpoint_every": 2}),
        (DataConfig, {"val_fraction": 0.5}),
        (DataConfig, {"seq_len": 4}),
        (CVAEConfig, {"kernel_size": 4}),
        (CVAEConfig, {"channels": ()}),
        (CVAEConfig, {"latent_dim": 0}),
        (ModelConfig, {"dtype": "float64"}),
        (ModelConfig, {"num_threads": 0}),
    ],
)
def test_out_of_range_values_are_rejected(model, data):
    with pytest.raises(ValidationError):
        model(**data)


def test_configs_are_frozen():
    cfg = LoraTrainConfig()
    with pytest.raises(ValidationError):
        cfg.rank = 4  # type: ignore[misc]


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "model:\n  name_or_path: /models/tiny\n"
        "lora:\n  steps: 20\n  rank: 4\n  target_modules: [q_proj, k_proj]\n"
        "cvae:\n  channels: [4, 8]\n  epochs: 3\n"
    )
    cfg = load_run_config(path, ["lora.rank=8", "cvae.kld_weight=0.01", "sample.seed=7", "eval.max_tokens=64"])
    assert cfg.model.name_or_path == "/models/tiny"
    assert cfg.lora.steps == 20
    assert cfg.lora.rank == 8  # the override wins over the file
    assert cfg.lora.target_modules == ("q_proj", "k_proj")
    assert cfg.cvae.channels == (4, 8) and cfg.cvae.epochs == 3
    assert cfg.cvae.kld_weight == 0.01
    assert cfg.sample.seed == 7 and cfg.eval.max_tokens == 64
    # Untouched sections keep their defaults.
    assert cfg.data == DataConfig()


def test_json_file_is_accepted(tmp_path):
    path = tmp_path / "run.json"
    path.write_text('{"sample": {"num_draws": 3}}')
    assert load_run_config(path).sample.num_draws == 3


def test_override_errors():
    with pytest.raises(ValueError, match="expected section.field=value"):
        load_run_config(None, ["lora.rank"])
    with pytest.raises(ValueError, match="lora.rank"):
        load_run_config(None, ["lora.rank=0"])
    with pytest.raises(ValueError, match="bogus"):
        load_run_config(None, ["lora.bogus=1"])
    with pytest.raises(ValueError, match="not a section"):
        load_run_config(None, ["lora.rank=4", "lora.rank.x=1"])


def test_bad_files(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_run_config(tmp_path / "missing.yaml")
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="mapping"):
        load_run_config(listing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("lora: [unclosed\n")
    with pytest.raises(ValueError, match="broken.yaml"):
        load_run_config(broken)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_run_config(empty) == RunConfig()


def test_config_env_gives_the_default_file(tmp_path, monkeypatch):
    machine = tmp_path / "machine.yaml"
    machine.write_text("lora: {steps: 12}\n", encoding="utf-8")
    other = tmp_path / "other.yaml"
    other.write_text("lora: {steps: 13}\n", encoding="utf-8")
    monkeypatch.setenv(CONFIG_ENV, str(machine))
    assert load_run_config().lora.steps == 12
    assert load_run_config(overrides=["lora.steps=14"]).lora.steps == 14
    assert load_run_config(other).lora.steps == 13  # an explicit file wins
    assert load_run_config(config_cls=ZeroShotRunConfig).lora.steps == LoraTrainConfig().steps  # run configs only
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "missing.yaml"))
    with pytest.raises(ValueError, match="missing.yaml: config file not found"):
        load_run_config()
