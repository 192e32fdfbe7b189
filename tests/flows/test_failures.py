"""Failures surface as a failed flow run whose message names the category at fault."""

from __future__ import annotations

import pytest

from flows.steps import CategoryFailed
from tests.flows.support import recipe_text, write_categories


def test_failed_category_fails_flow_naming_it(workspace, tmp_path):
    too_short = "Only a line or two of text.\n\nFar below the minimum.\n"
    assert len(too_short) < workspace.config.data.min_chars
    categories = write_categories(tmp_path / "short-data", {"recipes": recipe_text(), "tiny-notes": too_short})

    state = workspace.run(categories_file=categories)

    assert state.is_failed(), state
    assert "tiny-notes" in state.message
    with pytest.raises(CategoryFailed, match=r"stage prepare-data failed for tiny-notes") as failure:
        state.result()
    assert "recipes" not in str(failure.value)  # the healthy category is not blamed
    assert "only" in str(failure.value) and str(workspace.config.data.min_chars) in str(failure.value)
    # Nothing after the data stage started.
    assert not (workspace.root / "lora").exists()
