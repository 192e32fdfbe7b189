"""Tests of icm_core.infra.layout: stage folders under an artifacts root."""

from __future__ import annotations

import pytest

from icm_core.infra.layout import stage_dir


def test_stage_dir_validates_category(tmp_path):
    key = "0123456789abcdef0123"
    assert stage_dir(tmp_path, "lora", key, "news") == tmp_path / "lora" / "news" / key[:16]
    assert stage_dir(tmp_path, "generator", key) == tmp_path / "generator" / key[:16]
    with pytest.raises(ValueError, match="category"):
        stage_dir(tmp_path, "lora", key, "../escape")
    with pytest.raises(ValueError, match="unknown stage"):
        stage_dir(tmp_path, "bogus", key)
