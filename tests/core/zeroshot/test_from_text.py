"""icm_core.zeroshot.from_text: an adapter for a category nobody fine-tuned, from its text alone, on the tiny model.

Two generators are trained on the same two tiny categories: one on base-model task vectors (what a new
category's text gives), one on fine-tuned-model vectors (the paper's default; it must be refused)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from icm_core.data.text import DataError
from icm_core.generator.config import CVAEConfig, SampleConfig, TaskVectorConfig
from icm_core.generator.generator import load_generator
from icm_core.generator.stages import train_generator_stage
from icm_core.generator.task_vectors import TaskVectorKindError, task_vector_kind, text_hidden_state_vector
from icm_core.infra.io import read_json, save_tensors, sidecar_path, write_json
from icm_core.lora.adapters import read_adapter
from icm_core.lora.train import train_lora
from icm_core.models.base_model import load_base_model, load_tokenizer
from icm_core.zeroshot.from_text import (
    generator_vector_settings,
    plan_text_vector,
    read_text_source,
    text_adapter,
    text_condition_label,
)
from tests import helpers


CVAE = CVAEConfig(channels=(4, 8, 8, 4), latent_dim=8, epochs=3, batch_size=4, seed=7)
LORA = helpers.lora_config(steps=4, trajectory_size=2, checkpoint_every=2, batch_size=2)
TV = TaskVectorConfig(hidden_from="base", num_samples=4, sample_tokens=16)
TEXTS = {"prose": helpers.SAMPLE_TEXT, "symbols": helpers.OTHER_TEXT}
NEW_TEXT = (
    "Dear diary, the garden was quiet this morning; the roses opened and the bees came early.\n\n"
    "In the afternoon it rained, so I read by the window and wrote two letters to old friends.\n"
)


@pytest.fixture(scope="module")
def generators(tmp_path_factory, tiny_model_cfg) -> dict[str, Path]:
    """``{"base": ..., "finetuned": ..., "unrecorded": ...}`` generator files trained on the same two categories;
    they differ only in the kind their task vectors record (the vectors are Eq. 1 on the base model)."""
    root = tmp_path_factory.mktemp("new-category")
    name_or_path = tiny_model_cfg.name_or_path
    model, tokenizer = load_base_model(tiny_model_cfg), load_tokenizer(tiny_model_cfg)
    lora_dirs, vectors = {}, {}
    for name, text in TEXTS.items():
        blocks = helpers.char_blocks(text, 24, repeat=2)
        lora_dirs[name] = train_lora(
            load_base_model(tiny_model_cfg), blocks, LORA, root / "lora" / name, name_or_path
        ).folder
        vectors[name] = text_hidden_state_vector(model, tokenizer, [text], TV.num_samples, TV.sample_tokens, TV.seed)
    out = {}
    for label, hidden_from in (("base", "base"), ("finetuned", "finetuned"), ("unrecorded", None)):
        files = {}
        for name, vector in vectors.items():
            meta = {"category": name}
            if hidden_from is not None:
                cfg = TV.model_copy(update={"hidden_from": hidden_from})
                meta |= {"config": cfg.model_dump(mode="json"), "kind": task_vector_kind(cfg, name_or_path)}
            files[name] = root / label / "tv" / f"{name}.safetensors"
            save_tensors(files[name], {"task_vector": vector}, meta)
        out[label] = root / label / "generator.safetensors"
        train_generator_stage(lora_dirs, files, CVAE, out[label])
    return out


@pytest.fixture
def text_dir(tmp_path) -> Path:
    folder = tmp_path / "diary"
    folder.mkdir()
    first, second = NEW_TEXT.split("\n\n")
    (folder / "a.txt").write_text(first, encoding="utf-8")
    (folder / "b.txt").write_text(second, encoding="utf-8")
    (folder / ".hidden.txt").write_text("never read", encoding="utf-8")
    return folder


def test_the_generator_records_its_vectors_kind_and_config(generators, tiny_model_cfg):
    kind, config = generator_vector_settings(generators["base"])
    assert kind == f"hidden_state:base:{tiny_model_cfg.name_or_path}"
    assert config == TV.model_dump(mode="json")  # so a new category's samples are drawn the same way
    assert generator_vector_settings(generators["unrecorded"]) == (None, None)


def test_text_folder_gives_the_base_model_eq1_vector_and_its_adapter(generators, text_dir, tiny_model_cfg, tmp_path):
    from peft import PeftModel

    out = tmp_path / "out" / "adapter"
    result = text_adapter(generators["base"], out, SampleConfig(), text_path=text_dir, model_cfg=tiny_model_cfg)

    assert result["task_vector_kind"] == f"hidden_state:base:{tiny_model_cfg.name_or_path}"
    assert result["samples_used"] == TV.num_samples
    # The vector is Eq. 1 on the *base* model over k samples of the folder's text (hidden files skipped), and
    # the adapter is the generator's decoding of exactly that vector.
    docs = read_text_source(text_dir)
    assert docs == [s.strip() for s in NEW_TEXT.split("\n\n")]
    base, tokenizer = load_base_model(tiny_model_cfg), load_tokenizer(tiny_model_cfg)
    expected = text_hidden_state_vector(base, tokenizer, docs, TV.num_samples, TV.sample_tokens, TV.seed)
    state = load_generator(generators["base"]).generate(expected, SampleConfig())
    weights, config = read_adapter(out)
    assert set(weights) == set(state) and all(torch.equal(weights[k], state[k].float()) for k in state)
    assert config["r"] == LORA.rank

    ids = torch.arange(3, 35).unsqueeze(0)
    with torch.no_grad():
        base_logits = load_base_model(tiny_model_cfg)(input_ids=ids).logits
        model = PeftModel.from_pretrained(load_base_model(tiny_model_cfg), str(out)).eval()
        assert not torch.allclose(model(input_ids=ids).logits, base_logits)

    # k is configurable, and it changes the vector (so the condition label too).
    fewer = text_adapter(
        generators["base"],
        tmp_path / "k2",
        SampleConfig(),
        text_path=text_dir,
        model_cfg=tiny_model_cfg,
        num_samples=2,
    )
    assert fewer["samples_used"] == 2 and fewer["task_vector_config"]["num_samples"] == 2
    assert fewer["adapter_sha256"] != result["adapter_sha256"]
    plan, plan_k2 = plan_text_vector(generators["base"]), plan_text_vector(generators["base"], num_samples=2)
    assert text_condition_label(text_dir, plan) != text_condition_label(text_dir, plan_k2)
    assert text_condition_label(text_dir, plan).startswith("text-")


def test_a_single_text_file_works_and_a_short_text_uses_fewer_samples(generators, tiny_model_cfg, tmp_path):
    path = tmp_path / "note.txt"
    path.write_text("x" * 40, encoding="utf-8")  # 40 characters: two 16-token samples of the 4 asked
    result = text_adapter(generators["base"], tmp_path / "a", SampleConfig(), text_path=path, model_cfg=tiny_model_cfg)
    assert result["samples_used"] == 2


def test_a_generator_trained_on_finetuned_vectors_is_refused(generators, text_dir, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(TaskVectorKindError, match="hidden_from=base") as info:
        text_adapter(generators["finetuned"], out, SampleConfig(), text_path=text_dir)
    assert str(generators["finetuned"]) in str(info.value) and "hidden_state:finetuned" in str(info.value)
    with pytest.raises(TaskVectorKindError, match="records no task-vector kind"):
        text_adapter(generators["unrecorded"], out, SampleConfig(), text_path=text_dir)
    assert not out.exists()


def test_a_description_vector_generator_asks_for_the_description(generators, text_dir, tmp_path):
    described = tmp_path / "described.safetensors"
    tensors = generators["base"]
    described.write_bytes(tensors.read_bytes())
    side = read_json(sidecar_path(tensors))
    side["meta"]["task_vector_kind"] = "description:minilm"
    write_json(sidecar_path(described), side)
    with pytest.raises(ValueError, match="--description"):
        text_adapter(described, tmp_path / "out", SampleConfig(), text_path=text_dir)
    assert not (tmp_path / "out").exists()


def _unreadable(tmp_path: Path) -> Path:
    folder = tmp_path / "locked"
    folder.mkdir()
    (folder / "a.txt").write_text(NEW_TEXT, encoding="utf-8")
    (folder / "a.txt").chmod(0)
    return folder / "a.txt"


BAD_INPUTS = {
    "missing folder": (lambda p: p / "no-such-folder", "no such file or folder"),
    "folder without .txt": (lambda p: (p / "empty").mkdir() or p / "empty", "holds no .txt files"),
    "whitespace only": (lambda p: (p / "blank.txt").write_text(" \n\n\t\n") and p / "blank.txt", "no text"),
    "too short": (lambda p: (p / "short.txt").write_text("tiny text") and p / "short.txt", "too little text"),
    "not UTF-8": (lambda p: (p / "latin.txt").write_bytes(b"caf\xe9 " * 20) and p / "latin.txt", "not valid UTF-8"),
    "unreadable": (_unreadable, "cannot read"),
}


@pytest.mark.parametrize("problem", sorted(BAD_INPUTS))
def test_bad_text_input_names_the_path_and_writes_nothing(problem, generators, tiny_model_cfg, tmp_path):
    if problem == "unreadable" and os.geteuid() == 0:
        pytest.skip("root reads files whatever their mode")
    make, message = BAD_INPUTS[problem]
    source = make(tmp_path)
    out = tmp_path / "out" / "adapter"
    with pytest.raises(DataError, match=message) as info:
        text_adapter(generators["base"], out, SampleConfig(), text_path=source, model_cfg=tiny_model_cfg)
    assert str(source) in str(info.value)
    assert not out.exists() and not out.parent.exists()
