"""The generate-adapter flow: a PEFT adapter from the pipeline's generator, by category name or task vector."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from flows.generate import generate_adapter
from icm_core.adapters import adapter_sha256
from icm_core.io import sidecar_path


def sampled_adapter_sha(root: Path, category: str) -> str:
    """sha256 of the adapter the pipeline sampled and scored for ``category`` (z draw 0, the one latest.json
    names; the extra draws of the generator diagnostics sit beside it)."""
    [row] = [r for r in json.loads((root / "latest.json").read_text())["rows"] if r["category"] == category]
    return adapter_sha256(row["adapter_dir"])


def test_generate_adapter_flow(workspace, fresh_base):
    from peft import PeftModel

    state = workspace.run()
    assert state.is_completed(), state.message

    result = generate_adapter(category="recipes", root=str(workspace.root))

    folder = Path(result["adapter_dir"])
    [generator] = workspace.root.glob("generator/*/generator.safetensors")
    generator_id = json.loads(sidecar_path(generator).read_text())["sha256"][:12]
    assert folder == workspace.root / "generated" / generator_id / "category-recipes" / "seed-0-draws-1" / "adapter"
    # Same generator, same sample seed: the very adapter the pipeline sampled and evaluated.
    assert result["adapter_sha256"] == sampled_adapter_sha(workspace.root, "recipes")

    ids = torch.arange(3, 35).unsqueeze(0)
    with torch.no_grad():
        base_logits = fresh_base()(input_ids=ids).logits
    model = PeftModel.from_pretrained(fresh_base(), str(folder)).eval()
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert lora_b and any(bool(p.abs().sum() > 0) for p in lora_b)
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, base_logits)

    with pytest.raises(KeyError, match="no-such-category"):
        generate_adapter(category="no-such-category", root=str(workspace.root))
    assert not list(workspace.root.glob("generated/*/category-no-such-category"))


def test_generate_adapter_without_pipeline_run_names_root(workspace):
    with pytest.raises(FileNotFoundError, match="latest.json"):
        generate_adapter(category="recipes", root=str(workspace.root))


def test_generate_adapter_from_task_vector_file(workspace, tmp_path):
    """A task-vector file whose name is no valid Prefect artifact key still works (the key is slugified)."""
    assert workspace.run().is_completed()
    [vector] = workspace.root.glob("task_vectors/recipes/*/task_vector.safetensors")
    odd = tmp_path / "Recipes Vector.v2.safetensors"
    shutil.copy(vector, odd)
    shutil.copy(sidecar_path(vector), sidecar_path(odd))  # its sha256 / metadata sidecar

    state = generate_adapter(task_vector_file=str(odd), root=str(workspace.root), return_state=True)

    assert state.is_completed(), state.message
    result = state.result()
    folder = Path(result["adapter_dir"])
    assert folder.parent.parent.name.startswith("Recipes-Vector.v2-")  # stem + the file's sha256
    assert folder.is_relative_to(workspace.root / "generated")
    # The generator's stored condition for 'recipes' is this task vector, so the same adapter comes out.
    assert result["adapter_sha256"] == sampled_adapter_sha(workspace.root, "recipes")
