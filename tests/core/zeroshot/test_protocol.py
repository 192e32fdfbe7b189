"""Tests of icm_core.zeroshot.protocol: folds, leakage check, mean / k-NN adapters and the gap metric."""

from __future__ import annotations

import pytest
import torch

from icm_core.zeroshot.protocol import (
    assert_no_leakage,
    knn_weights,
    make_folds,
    scaling_size,
    scaling_subsets,
    shuffled_partner,
)


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


def test_knn_picks_the_nearest_by_cosine_and_softmax_weights_favour_it():
    keys = {"x": torch.tensor([1.0, 0.0]), "y": torch.tensor([0.0, 1.0]), "z": torch.tensor([-1.0, 0.1])}
    query = torch.tensor([0.9, 0.2])
    assert knn_weights(query, keys, k=1) == {"x": 1.0}
    assert knn_weights(torch.tensor([0.1, 1.0]), keys, k=1) == {"y": 1.0}
    soft = knn_weights(query, keys, k=2, temperature=0.1)
    assert set(soft) == {"x", "y"} and soft["x"] > soft["y"] and abs(sum(soft.values()) - 1) < 1e-9
    # magnitude does not matter, direction does
    assert knn_weights(query * 100, keys, k=1) == {"x": 1.0}


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


def test_zeroshot_config_refuses_vectors_a_held_out_category_cannot_have():
    from icm_core.generator.config import TaskVectorConfig
    from icm_core.zeroshot.config import ZeroShotRunConfig

    with pytest.raises(ValueError, match="hidden_from"):
        ZeroShotRunConfig(task_vector=TaskVectorConfig(hidden_from="finetuned"))
    assert ZeroShotRunConfig().task_vector.hidden_from == "base"
    assert ZeroShotRunConfig().cvae.epochs == 30  # the leave-out budget; the demo keeps its own
    assert ZeroShotRunConfig(task_vector=TaskVectorConfig(source="description")).task_vector.source == "description"
