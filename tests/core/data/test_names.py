"""Tests of icm_core.data.names: category names that can become folder names."""

from __future__ import annotations

import pytest

from icm_core.data.names import validate_category_name


@pytest.mark.parametrize("name", ["../x", "a/b", "A", "", "..", "a b", "x" * 65, "-lead", "a\\b", "é"])
def test_validate_category_name_rejects(name):
    with pytest.raises(ValueError, match="invalid category name"):
        validate_category_name(name)


@pytest.mark.parametrize("name", ["news", "python-code", "a", "x_1", "0abc", "x" * 64])
def test_validate_category_name_accepts(name):
    assert validate_category_name(name) == name
