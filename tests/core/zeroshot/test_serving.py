"""Tests of icm_core.zeroshot.serving and the protocol's selector stage: the serving library, ``adapt`` from a
folder of text, and that the selector never reads a category's validation or test text."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from icm_core.data.splits import CategorySplits, write_splits
from icm_core.data.text import DataError
from icm_core.data.tokens import sample_blocks, token_blocks
from icm_core.generator.config import CVAEConfig, TaskVectorConfig
from icm_core.generator.dataset import build_dataset
from icm_core.generator.generator import save_generator
from icm_core.generator.task_vectors import hidden_state_task_vector
from icm_core.generator.train import train_generator
from icm_core.infra.io import ArtifactError, save_tensors
from icm_core.lora.adapters import read_adapter, write_adapter
from icm_core.models.base_model import load_base_model, load_tokenizer
from icm_core.zeroshot.config import SelectorConfig
from icm_core.zeroshot.serving import adapt_from_text, prefix_task_vector, read_library, write_library
from icm_core.zeroshot.stages import selector_adapter
from tests import helpers


TV = TaskVectorConfig(hidden_from="base", num_samples=4, sample_tokens=16)
FAST = SelectorConfig(draws=2, mix_top=2, mix_trials=2, finetune_steps=1, finetune_batch=2)
TEXTS = {
    "prose": helpers.SAMPLE_TEXT * 6,
    "symbols": helpers.OTHER_TEXT * 6,
    "mixed": (helpers.SAMPLE_TEXT + helpers.OTHER_TEXT) * 4,
}


@pytest.fixture(scope="module")
def library(tiny_model_cfg, tmp_path_factory):
    """A small serving library on the tiny model: three categories' LoRAs and base-model task vectors, a multi-task
    and a mean adapter, and a generator trained on the three."""
    tmp = tmp_path_factory.mktemp("library-src")
    kind = f"hidden_state:base:{tiny_model_cfg.name_or_path}"
    config = {"r": 2, "lora_alpha": 8.0, "target_modules": ["q_proj", "v_proj"], "peft_type": "LORA",
              "base_model_name_or_path": tiny_model_cfg.name_or_path}  # fmt: skip
    model, tokenizer = load_base_model(tiny_model_cfg), load_tokenizer(tiny_model_cfg)
    adapters, vectors, checkpoints, conds = {}, {}, {}, {}
    for i, (name, text) in enumerate(TEXTS.items()):
        states = [{k: 0.05 * v for k, v in helpers.random_lora_state(helpers.tiny_model(), None, 10 * i + j).items()}
                  for j in range(2)]  # fmt: skip
        checkpoints[name] = states
        adapters[name] = write_adapter(tmp / name / "adapter", states[-1], config)
        blocks = sample_blocks(token_blocks([text], tokenizer, TV.sample_tokens), TV.num_samples, TV.seed)
        conds[name] = hidden_state_task_vector(model, blocks)
        vectors[name] = tmp / name / "task_vector.safetensors"
        save_tensors(vectors[name], {"task_vector": conds[name]},
                     {"category": name, "config": TV.model_dump(mode="json"), "kind": kind})  # fmt: skip
    cvae = CVAEConfig(channels=(4, 8), latent_dim=8, epochs=2, batch_size=2, seed=1)
    generator, _, _ = train_generator(build_dataset(checkpoints, conds), cvae, config)
    save_generator(tmp / "generator.safetensors", generator, {"task_vector_kind": kind})
    stored = {
        "multitask_lora": write_adapter(tmp / "multitask", {k: 0.5 * v for k, v in checkpoints["mixed"][0].items()},
                                        config),
        "mean_lora": adapters["prose"],
    }  # fmt: skip
    out = write_library(tmp / "lib", stored, adapters, vectors, {"icm_lora": tmp / "generator.safetensors"},
                        "multitask_lora", knn_k=2, knn_temperature=0.1)  # fmt: skip
    return out


def test_adapt_writes_the_winner_as_a_peft_folder_with_every_candidates_score(library, tiny_model_cfg, tmp_path):
    text = tmp_path / "new"
    text.mkdir()
    (text / "a.txt").write_text(helpers.SAMPLE_TEXT * 5)
    record = adapt_from_text(text, library, tmp_path / "out", FAST, tiny_model_cfg)

    names = {row["name"] for row in record["scores"]}
    assert names == {"multitask_lora", "mean_lora", "lora:prose", "lora:symbols", "lora:mixed", "knn_softmax",
                     "icm_lora:z0", "icm_lora:z1", "mix", "finetune"}  # fmt: skip
    assert [row["name"] for row in record["scores"] if row["chosen"]] == [record["winner"]]
    assert record["samples"] == TV.num_samples and record["task_vector_kind"].startswith("hidden_state:base:")
    state, config = read_adapter(tmp_path / "out")
    written = json.loads((tmp_path / "out" / "selection.json").read_text())
    assert written["winner"] == record["winner"] and config["base_model_name_or_path"] == tiny_model_cfg.name_or_path
    if record["winner"].startswith("lora:"):
        stored, _ = read_adapter(Path(library) / "categories" / record["winner"][5:] / "adapter")
        assert all(torch.equal(state[k], stored[k]) for k in stored)


def test_adapt_refuses_bad_input_before_writing_anything(library, tiny_model_cfg, tmp_path):
    short = tmp_path / "short"
    short.mkdir()
    (short / "a.txt").write_text("too short")
    with pytest.raises(DataError, match="too little text"):
        adapt_from_text(short, library, tmp_path / "out", FAST, tiny_model_cfg)
    with pytest.raises(ArtifactError, match="library.json: not found"):
        adapt_from_text(short, tmp_path, tmp_path / "out", FAST, tiny_model_cfg)
    broken = Path(shutil.copytree(library, tmp_path / "broken"))
    manifest = json.loads((broken / "library.json").read_text())
    manifest["categories"]["prose"]["adapter"] = "categories/missing"
    (broken / "library.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"categories\.prose names 'categories/missing'"):
        read_library(broken)
    assert not (tmp_path / "out").exists()


def test_the_selector_stage_never_reads_validation_or_test_text(library, tiny_model_cfg, tmp_path):
    """The protocol's selector scores on the samples of the train split only: with the validation and test files
    replaced by other text (so reading them would fail the sha256 check, or change the scores), it chooses the
    same adapter with the same scores."""
    lib = read_library(library)
    stored = {name: entry for name, entry in lib.stored.items()}
    splits = CategorySplits(train=[TEXTS["mixed"]], val=[TEXTS["prose"]], test=[TEXTS["symbols"]])
    runs = {}
    for label in ("intact", "tampered"):
        data = tmp_path / label / "splits"
        write_splits(splits, data)
        if label == "tampered":
            for name in ("val", "test"):  # other text, the index unchanged: any read of these files fails
                (data / f"{name}.jsonl").write_text(json.dumps({"text": helpers.OTHER_TEXT * 9}) + "\n")
        runs[label] = selector_adapter(
            data, stored, lib.categories, lib.generators, lib.vectors["mixed"], tiny_model_cfg, TV, FAST,
            tmp_path / label / "adapter",
        )  # fmt: skip
    assert runs["tampered"]["winner"] == runs["intact"]["winner"]
    assert runs["tampered"]["scores"] == runs["intact"]["scores"]
    assert runs["tampered"]["adapter_sha256"] == runs["intact"]["adapter_sha256"]
    # And the scores are on the train split's samples: another train split gives other scores.
    other = tmp_path / "other" / "splits"
    write_splits(CategorySplits(train=[TEXTS["prose"]], val=splits.val, test=splits.test), other)
    moved = selector_adapter(other, stored, lib.categories, lib.generators, lib.vectors["mixed"], tiny_model_cfg,
                             TV, FAST, tmp_path / "other" / "adapter")  # fmt: skip
    assert moved["scores"] != runs["intact"]["scores"]


def test_the_task_vector_from_the_shared_prefix_equals_eq_1(tiny_model_cfg):
    model, tokenizer = load_base_model(tiny_model_cfg), load_tokenizer(tiny_model_cfg)
    blocks = sample_blocks(token_blocks([TEXTS["mixed"]], tokenizer, TV.sample_tokens), TV.num_samples, TV.seed)
    full = hidden_state_task_vector(model, blocks)
    for start in (0, 1):
        assert torch.allclose(prefix_task_vector(model, blocks, start, batch_size=3), full, atol=1e-5), start
