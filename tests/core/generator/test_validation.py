"""The generator's early stopping on the categories' validation split (icm_core.generator.validation)."""

from __future__ import annotations

import math

import pytest
import torch

from icm_core.data.categories import Category
from icm_core.data.config import DataConfig
from icm_core.data.splits import CategorySplits, read_splits, write_splits
from icm_core.data.stages import prepare_data
from icm_core.evaluation.config import EvalConfig
from icm_core.evaluation.stages import evaluate_adapter
from icm_core.generator.config import CVAEConfig, TaskVectorConfig
from icm_core.generator.generator import load_generator
from icm_core.generator.stages import compute_task_vector, train_generator_stage
from icm_core.generator.validation import validation_scorer
from icm_core.infra.io import read_json, sidecar_path
from icm_core.lora.adapters import write_adapter
from icm_core.lora.stages import finetune_lora
from icm_core.lora.trajectory import final_lora_state, load_trajectory_checkpoints, read_trajectory
from tests import helpers


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_base_dir) -> dict:
    """Two categories fine-tuned on the tiny model, with task vectors."""
    root = tmp_path_factory.mktemp("generator-validation")
    model_cfg = helpers.model_config(tiny_base_dir)
    data_cfg = DataConfig(seq_len=24, min_chars=200)
    lora_cfg = helpers.lora_config(steps=4, trajectory_size=2, checkpoint_every=2, lr=3e-2)
    tv_cfg = TaskVectorConfig(num_samples=2, sample_tokens=16)
    splits, loras, vectors = {}, {}, {}
    for name, text in {"prose": helpers.SAMPLE_TEXT, "symbols": helpers.OTHER_TEXT}.items():
        source = root / f"{name}.txt"
        source.write_text("\n\n".join(f"Document {i}. {text}" for i in range(24)))
        category = Category(name=name, source=str(source), description=f"{name} text")
        splits[name] = root / "data" / name
        prepare_data(category, data_cfg, splits[name])
        loras[name] = root / "lora" / name
        finetune_lora(splits[name], model_cfg, data_cfg, lora_cfg, loras[name])
        vectors[name] = root / "tv" / f"{name}.safetensors"
        compute_task_vector(category, splits[name], loras[name], model_cfg, data_cfg, tv_cfg, vectors[name])
    return {
        "root": root,
        "model_cfg": model_cfg,
        "data_cfg": data_cfg,
        "splits": splits,
        "loras": loras,
        "vectors": vectors,
    }


def test_scorer_is_the_mean_validation_nll_of_the_adapters(trained, tmp_path):
    """The scorer merges in-memory adapters and gives the per-token NLL that the evaluation code gives on the
    validation split (averaged over categories)."""
    config = read_trajectory(trained["loras"]["prose"]).adapter_config
    score = validation_scorer(trained["splits"], trained["model_cfg"], trained["data_cfg"], 96, config)
    states = {name: load_trajectory_checkpoints(folder)[-1] for name, folder in trained["loras"].items()}
    expected = []
    for name, state in states.items():
        write_adapter(tmp_path / name, state, config)
        # evaluate_adapter scores the test split; point it at a copy whose test split is the validation split.
        splits = read_splits(trained["splits"][name])
        splits_dir = tmp_path / f"{name}-val-as-test"
        write_splits(CategorySplits(train=splits.train, val=splits.val, test=splits.val), splits_dir)
        result = evaluate_adapter(
            splits_dir, tmp_path / name, trained["model_cfg"], trained["data_cfg"], EvalConfig(max_tokens=96)
        )
        expected.append(result["nll_nats"] / result["tokens"])
    assert score(states) == pytest.approx(sum(expected) / len(expected), rel=1e-5)
    # The criterion sees the weights: other deltas, another score.
    scaled = {n: {k: v * 30 for k, v in s.items()} for n, s in states.items()}
    assert abs(score(scaled) - score(states)) > 1e-3


def test_worst_gap_criterion_is_the_largest_unrecovered_share(trained):
    """The default criterion: the worst category's share of its base-to-LoRA validation gap left unrecovered."""
    config = read_trajectory(trained["loras"]["prose"]).adapter_config
    score = validation_scorer(
        trained["splits"], trained["model_cfg"], trained["data_cfg"], 96, config, criterion="worst_gap"
    )
    with pytest.raises(ValueError, match="base and LoRA validation NLL"):
        score.unrecovered({"prose": 1.0})
    finals = {name: final_lora_state(folder) for name, folder in trained["loras"].items()}
    score.with_reference(finals)
    base = score.per_category(dict.fromkeys(finals))
    lora = score.per_category(finals)
    assert score.reference == {n: (base[n], lora[n]) for n in finals}
    qualifying = [n for n in finals if base[n] - lora[n] >= 1e-4]
    assert qualifying, (base, lora)  # the tiny fine-tunes beat the base model on validation
    assert score(finals) == pytest.approx(0.0, abs=1e-9)  # the LoRAs themselves leave nothing unrecovered
    weaker = {n: {k: v * 0.5 for k, v in state.items()} for n, state in finals.items()}
    values = score.per_category(weaker)
    shares = {n: (values[n] - lora[n]) / (base[n] - lora[n]) for n in qualifying}
    assert score(weaker) == pytest.approx(max(shares.values()), rel=1e-9)
    assert score(weaker) > 0
    assert score(dict.fromkeys(finals)) == pytest.approx(1.0)  # the base model recovers nothing


def test_generator_stops_on_validation_and_records_it(trained, tmp_path):
    cvae = CVAEConfig(
        channels=(4, 8, 8, 4), latent_dim=8, epochs=40, batch_size=2, val_every=2, patience=2, min_delta=10.0
    )  # nothing counts as better after the first check: stop at the 3rd
    out = tmp_path / "generator.safetensors"
    validation = {"split_dirs": trained["splits"], "model_cfg": trained["model_cfg"], "data_cfg": trained["data_cfg"]}
    result = train_generator_stage(
        {n: str(p) for n, p in trained["loras"].items()}, trained["vectors"], cvae, out, validation=validation
    )
    assert result["epochs_run"] == 6 and result["best_epoch"] == 1
    history = read_json(sidecar_path(out))["meta"]["history"]
    assert [row["epoch"] for row in history if "val" in row] == [1, 3, 5]
    assert all(math.isfinite(row["val"]) for row in history if "val" in row)
    generator = load_generator(out)
    state = generator.generate_for("prose")
    assert all(bool(torch.isfinite(t).all()) for t in state.values())


def test_without_validation_text_training_runs_to_the_ceiling(trained, tmp_path):
    cvae = CVAEConfig(channels=(4, 8, 8, 4), latent_dim=8, epochs=3, batch_size=2, val_every=1, patience=1)
    result = train_generator_stage(
        {n: str(p) for n, p in trained["loras"].items()}, trained["vectors"], cvae, tmp_path / "g.safetensors"
    )
    assert result["epochs_run"] == 3 and result["best_epoch"] is None
