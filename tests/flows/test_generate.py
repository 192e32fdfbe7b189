"""The generate-adapter flow: a PEFT adapter from the pipeline's generator, by category name or task vector."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from flows.generate import generate_adapter
from icm_core.infra.io import sidecar_path
from icm_core.lora.adapters import adapter_sha256


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


def base_vector_config(workspace):
    """The workspace's run config with base-model task vectors: what a new category's text can give."""
    tv = workspace.config.task_vector.model_copy(update={"hidden_from": "base"})
    return workspace.config.model_copy(update={"task_vector": tv})


def write_text_folder(folder: Path) -> Path:
    """A new category nobody fine-tuned: a folder of .txt files (a house inventory, unlike recipes and forecasts)."""
    from tests.ops.support import inventory_text

    folder.mkdir(parents=True)
    for i, doc in enumerate(inventory_text().split("\n\n")):
        (folder / f"room-{i}.txt").write_text(doc, encoding="utf-8")
    return folder


def test_generate_adapter_from_a_new_categorys_text_folder(workspace, tmp_path, fresh_base):
    """End to end: a pipeline run with base-model vectors, then an adapter for a category it never saw, from a
    folder of its text alone; the same request gives the same folder and bytes, another k another folder."""
    from peft import PeftModel

    from icm_core.generator.config import SampleConfig
    from icm_core.generator.generator import load_generator
    from icm_core.generator.task_vectors import text_hidden_state_vector
    from icm_core.lora.adapters import read_adapter
    from icm_core.models.base_model import load_base_model, load_tokenizer
    from icm_core.zeroshot.from_text import read_text_source

    cfg = base_vector_config(workspace)
    assert workspace.run(config=cfg).is_completed()
    text = write_text_folder(tmp_path / "inventory")

    result = generate_adapter(text=str(text), root=str(workspace.root), model=cfg.model)

    folder = Path(result["adapter_dir"])
    [generator] = workspace.root.glob("generator/*/generator.safetensors")
    generator_id = json.loads(sidecar_path(generator).read_text())["sha256"][:12]
    assert folder.parent.parent.parent == workspace.root / "generated" / generator_id
    assert folder.parent.parent.name.startswith("text-") and folder.parent.name == "seed-0-draws-1"
    assert result["task_vector_kind"] == f"hidden_state:base:{cfg.model.name_or_path}"
    # The adapter is the generator's decoding of Eq. 1 on the base model over k samples of the folder's text.
    tv = cfg.task_vector
    vector = text_hidden_state_vector(
        load_base_model(cfg.model), load_tokenizer(cfg.model), read_text_source(text), tv.num_samples,
        tv.sample_tokens, tv.seed,
    )  # fmt: skip
    state = load_generator(generator).generate(vector, SampleConfig())
    weights, _ = read_adapter(folder)
    assert set(weights) == set(state) and all(torch.equal(weights[k], state[k]) for k in state)
    loaded = PeftModel.from_pretrained(fresh_base(), str(folder)).state_dict()  # a standard PEFT folder
    assert sum("lora_" in k for k in loaded) == len(state)

    again = generate_adapter(text=str(text), root=str(workspace.root), model=cfg.model)
    assert (again["adapter_dir"], again["adapter_sha256"]) == (result["adapter_dir"], result["adapter_sha256"])
    other_k = generate_adapter(text=str(text), root=str(workspace.root), model=cfg.model, num_samples=1)
    assert other_k["adapter_dir"] != result["adapter_dir"] and other_k["samples_used"] == 1


def test_generate_from_text_refuses_a_generator_trained_on_finetuned_vectors(workspace, tmp_path):
    """The default pipeline's generator is conditioned on fine-tuned-model vectors: a new category has none."""
    from icm_core.generator.task_vectors import TaskVectorKindError

    assert workspace.config.task_vector.hidden_from == "finetuned"
    assert workspace.run().is_completed()
    text = write_text_folder(tmp_path / "inventory")
    with pytest.raises(TaskVectorKindError, match=r"hidden_from=base") as info:
        generate_adapter(text=str(text), root=str(workspace.root))
    assert "hidden_state:finetuned" in str(info.value)
    assert not (workspace.root / "generated").exists()


def test_generate_from_bad_text_names_the_path_and_writes_nothing(workspace, tmp_path):
    from icm_core.data.text import DataError

    assert workspace.run(config=base_vector_config(workspace)).is_completed()
    (tmp_path / "empty").mkdir()
    (tmp_path / "short.txt").write_text("Item 1: a lamp.", encoding="utf-8")  # fewer tokens than one sample
    for name, message in (("missing", "no such file"), ("empty", "no .txt files"), ("short.txt", "too little text")):
        source = tmp_path / name
        with pytest.raises(DataError, match=message) as info:
            generate_adapter(text=str(source), root=str(workspace.root), model=workspace.config.model)
        assert str(source) in str(info.value)
        assert not (workspace.root / "generated").exists()
