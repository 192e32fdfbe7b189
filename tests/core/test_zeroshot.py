"""Tests of icm_core.zeroshot.protocol: folds, leakage check, mean / k-NN adapters and the gap metric."""

from __future__ import annotations

import pytest
import torch

from icm_core.lora.arithmetic import merged_delta, weighted_delta_adapter
from icm_core.zeroshot.protocol import (
    assert_no_leakage,
    knn_weights,
    make_folds,
    scaling_size,
    scaling_subsets,
    shuffled_partner,
)
from icm_core.zeroshot.results import bootstrap_gap, cross_category_matrix, gap_recovered, summarize
from tests import helpers


NAMES = [f"cat{i:02d}" for i in range(10)]


def test_folds_are_deterministic_disjoint_and_cover_every_category():
    folds = make_folds(NAMES, 4, seed=0)
    assert folds == make_folds(list(reversed(NAMES)), 4, seed=0)  # order of the input does not matter
    assert sorted(n for f in folds for n in f) == sorted(NAMES)
    assert [len(f) for f in folds] == [3, 3, 2, 2]
    assert make_folds(NAMES, 4, seed=1) != folds
    with pytest.raises(ValueError, match="two held-out"):
        make_folds(NAMES[:5], 4)
    with pytest.raises(ValueError, match="duplicate"):
        make_folds(["a", "a", "b", "c"], 2)


def test_leakage_check_fails_when_a_held_out_category_is_seen():
    assert_no_leakage(["a", "b"], {"generator": ["c", "d"], "multitask text": ["c", "d"]})
    with pytest.raises(AssertionError, match=r"multitask text: \['b'\]"):
        assert_no_leakage(["a", "b"], {"generator": ["c", "d"], "multitask text": ["b", "c"]})


def test_shuffled_partner_never_keeps_the_own_vector():
    pairs = shuffled_partner(["c", "a", "b"])
    assert pairs == {"a": "b", "b": "c", "c": "a"}
    assert all(k != v for k, v in pairs.items())


def _adapters(n: int):
    cfg = helpers.lora_config(rank=2)
    out = []
    for seed in range(n):
        state = helpers.random_lora_state(helpers.tiny_model(), cfg, seed=seed)
        config = {"r": 2, "lora_alpha": 8.0, "target_modules": ["q_proj", "v_proj"]}
        out.append((state, config))
    return out


def test_mean_lora_is_the_exact_mean_of_weight_deltas():
    adapters = _adapters(3)
    state, config = weighted_delta_adapter(adapters, [1 / 3] * 3)
    mean = merged_delta(state, config)
    deltas = [merged_delta(s, c) for s, c in adapters]
    for module, value in mean.items():
        expected = sum(d[module] for d in deltas) / 3
        assert torch.allclose(value, expected, atol=1e-6), module
    assert config["r"] == 6


def test_weighted_adapter_applies_the_weights():
    adapters = _adapters(2)
    state, config = weighted_delta_adapter(adapters, [0.8, 0.2])
    got = merged_delta(state, config)
    for module, value in got.items():
        expected = 0.8 * merged_delta(*adapters[0])[module] + 0.2 * merged_delta(*adapters[1])[module]
        assert torch.allclose(value, expected, atol=1e-6)


def test_knn_picks_the_nearest_by_cosine_and_softmax_weights_favour_it():
    keys = {"x": torch.tensor([1.0, 0.0]), "y": torch.tensor([0.0, 1.0]), "z": torch.tensor([-1.0, 0.1])}
    query = torch.tensor([0.9, 0.2])
    assert knn_weights(query, keys, k=1) == {"x": 1.0}
    assert knn_weights(torch.tensor([0.1, 1.0]), keys, k=1) == {"y": 1.0}
    soft = knn_weights(query, keys, k=2, temperature=0.1)
    assert set(soft) == {"x", "y"} and soft["x"] > soft["y"] and abs(sum(soft.values()) - 1) < 1e-9
    # magnitude does not matter, direction does
    assert knn_weights(query * 100, keys, k=1) == {"x": 1.0}


def test_gap_recovered_and_paired_bootstrap():
    assert gap_recovered(3.0, 2.0, 2.5) == 0.5
    assert gap_recovered(3.0, 3.0, 2.5) is None
    torch.manual_seed(0)
    base = [3.0 + 0.1 * float(x) for x in torch.randn(40)]
    nll = {
        "a": {"base": base, "oracle": [b - 1.0 for b in base], "m": [b - 0.5 for b in base]},
        "b": {"base": base, "oracle": [b - 1.0 for b in base], "m": [b - 0.25 for b in base]},
        "flat": {"base": base, "oracle": base, "m": base},  # oracle did not improve: excluded
    }
    out = bootstrap_gap(nll, ["m"], samples=200)
    assert out["excluded"] == ["flat"]
    assert out["per_category"]["a"]["m"]["gap"] == pytest.approx(0.5)
    # paired: block noise shared by all methods cancels, so the interval is tight
    assert out["per_category"]["a"]["m"]["high"] - out["per_category"]["a"]["m"]["low"] < 1e-6
    assert out["macro"]["m"]["gap"] == pytest.approx(0.375)


def test_summary_has_the_issue_format():
    base = [3.0, 3.1, 2.9, 3.2]
    nll = {}
    for i, cat in enumerate(["a", "b", "c", "d"]):
        nll[cat] = {"base": base, "oracle": [b - 1 for b in base]}
        for j, m in enumerate(["mean_lora", "multitask_lora", "nn1", "knn_softmax", "icm_lora"]):
            nll[cat][m] = [b - 0.1 * (j + 1) - 0.01 * i for b in base]
    out = summarize(nll, [["a", "b"], ["c", "d"]], samples=50)
    summary = out["summary"]
    assert summary["categories"] == 4 and summary["folds"] == 2
    assert summary["macro_gain"]["icm_lora"] == pytest.approx(
        0.5 + 0.015
    )  # (base - method) / (base - oracle) = 0.5 + 0.01 i
    assert summary["win_rate"]["icm_lora_vs_mean_lora"] == 1.0
    assert set(summary["win_rate"]) == {
        f"icm_lora_vs_{m}" for m in ["mean_lora", "multitask_lora", "nn1", "knn_softmax"]
    }


def test_scaling_subsets_are_nested_deterministic_and_below_the_full_set():
    train = [f"cat{i:02d}" for i in range(12)]
    subsets = scaling_subsets(train, [8, 3, 12, 20, 3], seed=4)
    assert list(subsets) == [3, 8]  # sorted, duplicates merged, sizes >= 12 left to the full generator
    assert subsets == scaling_subsets(list(reversed(train)), [3, 8], seed=4)  # depends on the set, not its order
    assert all(len(subsets[s]) == s and subsets[s] == sorted(subsets[s]) for s in subsets)
    assert set(subsets[3]) < set(subsets[8]) < set(train)
    assert scaling_subsets(train, [3], seed=5)[3] != subsets[3] or scaling_subsets(train, [3], seed=6)[3] != subsets[3]
    with pytest.raises(ValueError, match="scaling_sizes"):
        scaling_subsets(train, [0], seed=0)
    assert scaling_size("icm_lora@8") == 8 and scaling_size("icm_lora") is None and scaling_size("icm_lora@z1") is None


def test_summary_scaling_curve_ends_at_the_full_generator():
    base = [3.0, 3.1, 2.9, 3.2]
    nll = {}
    for cat in ["a", "b", "c", "d", "e"]:
        nll[cat] = {"base": base, "oracle": [b - 1 for b in base], "mean_lora": [b - 0.3 for b in base]}
        nll[cat]["icm_lora"] = [b - 0.6 for b in base]
        nll[cat]["icm_lora@2"] = [b - 0.4 for b in base]
        nll[cat]["icm_lora@1"] = [b - 0.2 for b in base]
    summary = summarize(nll, [["a", "b", "c"], ["d", "e"]], samples=20)["summary"]
    points = summary["scaling"]
    assert [p["method"] for p in points] == ["icm_lora@1", "icm_lora@2", "icm_lora"]
    assert [p["training_categories"] for p in points] == [1, 2, 2.5] and points[-1]["per_fold"] == [2, 3]
    assert [p["macro_gain"] for p in points] == pytest.approx([0.2, 0.4, 0.6])
    assert all(p["ci95"][0] - 1e-9 <= p["macro_gain"] <= p["ci95"][1] + 1e-9 for p in points)
    assert "icm_lora_vs_icm_lora@1" not in summary["win_rate"]  # win rates stay against baselines and controls
    assert summary["folds_evaluated"] == 2 and summary["complete"]


def test_interim_summary_counts_the_scored_folds_only():
    base = [3.0, 3.1, 2.9, 3.2]
    nll = {}
    for cat in ["d", "e"]:  # fold 1 of [[a, b, c], [d, e]] scored, fold 0 not yet
        nll[cat] = {"base": base, "oracle": [b - 1 for b in base], "mean_lora": [b - 0.3 for b in base]}
        nll[cat]["icm_lora"] = [b - 0.6 for b in base]
        nll[cat]["icm_lora@1"] = [b - 0.2 for b in base]
    summary = summarize(nll, [["a", "b", "c"], ["d", "e"]], samples=20)["summary"]
    assert summary["categories"] == 2 and summary["folds"] == 2
    assert summary["folds_evaluated"] == 1 and not summary["complete"]
    # fold 1's generator trained on the 3 categories of fold 0, out of 5 in all
    assert summary["scaling"][-1]["training_categories"] == 3 and summary["scaling"][-1]["per_fold"] == [3]
    partial = summarize({"a": nll["d"]}, [["a", "b", "c"], ["d", "e"]], samples=20)["summary"]
    assert partial["folds_evaluated"] == 0 and "scaling" not in partial


def test_zeroshot_config_refuses_vectors_a_held_out_category_cannot_have():
    from icm_core.generator.config import TaskVectorConfig
    from icm_core.zeroshot.config import ZeroShotRunConfig

    with pytest.raises(ValueError, match="hidden_from"):
        ZeroShotRunConfig(task_vector=TaskVectorConfig(hidden_from="finetuned"))
    assert ZeroShotRunConfig().task_vector.hidden_from == "base"
    assert ZeroShotRunConfig().cvae.epochs == 30  # the leave-out budget; the demo keeps its own
    assert ZeroShotRunConfig(task_vector=TaskVectorConfig(source="description")).task_vector.source == "description"


def test_block_evaluation_is_each_test_blocks_mean_nll(tmp_path, tiny_base_dir, fresh_base):
    """The leave-out flow's per-block NLL (the demo's evaluation: shared base model, adapter merged in place,
    layers below the adapter run once) equals each block's mean NLL under a whole forward of a freshly merged
    model; starting the base model's pass at the adapter's layer (``prefix_like``) changes no number."""
    import torch.nn.functional as F
    from peft import get_peft_model

    from icm_core.data.config import DataConfig
    from icm_core.data.splits import CategorySplits, write_splits
    from icm_core.evaluation.config import EvalConfig
    from icm_core.evaluation.perplexity import eval_blocks
    from icm_core.evaluation.stages import evaluate_adapter
    from icm_core.lora.adapters import adapter_config_dict, lora_config_for, merge_adapter, write_adapter
    from icm_core.models.base_model import load_tokenizer

    model_cfg, data_cfg, eval_cfg = helpers.model_config(tiny_base_dir), DataConfig(seq_len=24), EvalConfig()
    splits = tmp_path / "splits"
    write_splits(CategorySplits(train=[helpers.SAMPLE_TEXT], val=[], test=[helpers.SAMPLE_TEXT * 2]), splits)
    lora_cfg = helpers.lora_config(last_n_layers=1)  # the last of two layers: the base pass can share layer 0
    model = fresh_base()
    config = adapter_config_dict(get_peft_model(model, lora_config_for(model, lora_cfg, "tiny")), str(tmp_path))
    config.pop("base_model_name_or_path")
    state = helpers.random_lora_state(fresh_base(), lora_cfg, seed=3)
    adapter = write_adapter(tmp_path / "adapter", {k: 0.05 * v for k, v in state.items()}, config)

    blocks = eval_blocks([helpers.SAMPLE_TEXT * 2], load_tokenizer(model_cfg), data_cfg.seq_len, eval_cfg.max_tokens)

    def expected(model) -> list[float]:
        with torch.no_grad():
            logits = model.eval()(input_ids=blocks.input_ids).logits[:, :-1].float()
            nll = F.cross_entropy(logits.transpose(1, 2), blocks.input_ids[:, 1:], reduction="none")
        return nll.mean(dim=1).tolist()

    def block_means(adapter_dir, **kwargs) -> list[float]:
        score = evaluate_adapter(splits, adapter_dir, model_cfg, data_cfg, eval_cfg, **kwargs)
        return [total / tokens for total, tokens in zip(score["block_nll"], score["block_tokens"], strict=True)]

    base = block_means(None, prefix_like=adapter)
    tuned = block_means(adapter)
    whole = block_means(None)
    assert len(base) == len(tuned) == blocks.input_ids.shape[0] > 1
    assert base == pytest.approx(expected(fresh_base()), rel=1e-5)
    assert tuned == pytest.approx(expected(merge_adapter(fresh_base(), adapter)), rel=1e-5)
    assert whole == pytest.approx(base, rel=1e-6)
    assert abs(sum(tuned) / len(tuned) - sum(base) / len(base)) > 1e-4  # the adapter is scored, not the base model


def test_cross_category_matrix_is_the_share_of_each_targets_own_gain():
    nll = {  # target -> source -> mean NLL on the target's test text
        "code": {"code": 2.0, "prose": 2.9, "poems": 3.1},
        "prose": {"code": 4.2, "prose": 3.5, "poems": 3.6},
        "poems": {"code": 5.0, "prose": 4.05, "poems": 4.2},
    }
    base = {"code": 3.0, "prose": 4.0, "poems": 4.5}
    matrix = cross_category_matrix(nll, base)
    share = matrix["share"]
    assert all(share[t][t] == pytest.approx(1.0) for t in nll)
    assert share["code"]["prose"] == pytest.approx(0.1)  # (3.0 - 2.9) / (3.0 - 2.0)
    assert share["prose"]["code"] == pytest.approx(-0.4)  # another category's LoRA can hurt
    assert share["poems"]["prose"] == pytest.approx(1.5)  # ... or beat the own one
    info = matrix["summary"]
    assert info["targets_beaten_by_another_lora"] == {"poems": "prose"}
    assert info["max_off_diagonal"] == pytest.approx(1.5) and info["scored_targets"] == 3
    assert info["mean_off_diagonal"] == pytest.approx((0.1 - 0.1 - 0.4 + 0.8 - 5 / 3 + 1.5) / 6)
    # A target whose own LoRA does not beat the base model has no shares (and is not counted).
    flat = cross_category_matrix({**nll, "code": {"code": 3.0, "prose": 2.9, "poems": 3.1}}, base)
    assert flat["share"]["code"] == {"code": None, "prose": None, "poems": None}
    assert flat["summary"]["scored_targets"] == 2
    with pytest.raises(ValueError, match="prose <- poems"):
        cross_category_matrix({**nll, "prose": {"code": 4.2, "prose": 3.5}}, base)
