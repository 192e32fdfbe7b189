"""Tests of icm_core.infra.config: the config fingerprint."""

from __future__ import annotations

from pathlib import Path

from icm_core.config import RunConfig, load_run_config
from icm_core.infra.config import config_fingerprint
from icm_core.models.config import ModelConfig


def test_fingerprint_is_stable_and_sensitive():
    a = config_fingerprint(RunConfig(), "0.1.0", ["x", "y"])
    b = config_fingerprint(RunConfig(), "0.1.0", ["x", "y"])
    assert a == b and len(a) == 64
    assert config_fingerprint(load_run_config(None, ["lora.seed=1"]), "0.1.0", ["x", "y"]) != a
    assert config_fingerprint(load_run_config(None, ["cvae.kld_weight=0.006"]), "0.1.0", ["x", "y"]) != a
    assert config_fingerprint(RunConfig(), "0.1.1", ["x", "y"]) != a
    assert config_fingerprint(RunConfig(), "0.1.0", ["y", "x"]) != a
    # Equal configs built different ways hash the same; Paths hash as their string.
    assert config_fingerprint(ModelConfig(cache_dir=Path("a/b"))) == config_fingerprint(ModelConfig(cache_dir="a/b"))
    assert config_fingerprint(Path("a/b")) == config_fingerprint("a/b")
