"""The condition-geometry analysis: exact inner products from LoRA factors, rank statistics, the Mantel test and the
nearest-neighbour transfer table."""

from __future__ import annotations

import pytest
import torch

from icm_core.lora.arithmetic import delta_weights, lora_scaling
from icm_core.zeroshot.geometry import (
    adapter_gram,
    combination_cosine,
    condition_geometry,
    cosine_from_gram,
    delta_inner,
    family_contrast,
    library_reach,
    lora_factors,
    mantel,
    neighbour_transfer,
    rank,
    span_cosine,
    spearman,
)


CONFIG = {"r": 2, "lora_alpha": 4}


def _state(seed: int, modules=("layers.0.q_proj", "layers.1.v_proj")) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for module in modules:
        state[f"{module}.lora_A.weight"] = torch.randn(2, 6, generator=g)
        state[f"{module}.lora_B.weight"] = torch.randn(5, 2, generator=g)
    return state


def _dense(state) -> torch.Tensor:
    deltas = delta_weights(state, lora_scaling(CONFIG))
    return torch.cat([deltas[m].flatten() for m in sorted(deltas)])


def test_inner_product_from_factors_equals_the_dense_weight_change():
    x, y = _state(0), _state(1)
    expected = float(_dense(x) @ _dense(y))
    assert delta_inner(lora_factors(x, CONFIG), lora_factors(y, CONFIG)) == pytest.approx(expected, rel=1e-10)


def test_gram_is_symmetric_and_its_cosines_match_dense_cosines():
    states = [_state(s) for s in range(4)]
    gram = adapter_gram([lora_factors(s, CONFIG) for s in states])
    dense = torch.stack([_dense(s) for s in states])
    assert torch.allclose(gram, gram.T)
    expected = torch.nn.functional.cosine_similarity(dense[:, None], dense[None], dim=-1)
    assert torch.allclose(cosine_from_gram(gram), expected, atol=1e-10)


def test_different_modules_are_refused():
    x = lora_factors(_state(0), CONFIG)
    y = lora_factors(_state(1, modules=("layers.0.q_proj",)), CONFIG)
    with pytest.raises(ValueError, match="different modules"):
        delta_inner(x, y)


def test_combination_cosine_matches_the_dense_weighted_sum():
    states = [_state(s) for s in range(4)]
    dense = torch.stack([_dense(s) for s in states])
    gram = adapter_gram([lora_factors(s, CONFIG) for s in states])
    weights = {1: 0.5, 2: 0.3, 3: 0.2}
    combined = sum(w * dense[j] for j, w in weights.items())
    expected = float(torch.nn.functional.cosine_similarity(dense[0], combined, dim=0))
    assert combination_cosine(gram, 0, weights) == pytest.approx(expected)
    mean_of_others = dense[1:].mean(0)  # the mean LoRA of a library without adapter 0
    expected = float(torch.nn.functional.cosine_similarity(dense[0], mean_of_others, dim=0))
    assert combination_cosine(gram, 0, {j: 1 / 3 for j in (1, 2, 3)}) == pytest.approx(expected)


def _sum(*factors) -> dict:
    """The factors of the sum of several adapters' weight changes (ranks concatenated)."""
    return {
        m: (torch.cat([f[m][0] for f in factors], 1), torch.cat([f[m][1] for f in factors], 0)) for m in factors[0]
    }


def test_span_cosine_is_one_inside_the_span_and_zero_outside_it():
    a, b, c = (lora_factors(_state(s), CONFIG) for s in range(3))
    inside = adapter_gram([a, b, c, _sum(a, b)])
    assert span_cosine(inside, 3, [0, 1, 2]) == pytest.approx(1.0)
    assert span_cosine(inside, 3, [2]) < 1.0
    orthogonal = {m: (bx, torch.zeros_like(ax)) for m, (bx, ax) in a.items()}  # dW = 0: nothing to hold
    assert span_cosine(adapter_gram([a, b, orthogonal]), 2, [0, 1]) == 0.0


def test_library_reach_leaves_each_category_out_and_bounds_it_by_the_oracles():
    names = ["a", "b", "c", "d"]
    adapters = [lora_factors(_state(s), CONFIG) for s in range(3)]
    adapters.append(_sum(adapters[0], adapters[1]))  # d's adapter is a + b: in the span of the others
    gram = adapter_gram(adapters)
    vectors = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.0, 1.0]), "c": torch.tensor([-1.0, 0.0]),
               "d": torch.tensor([0.9, 0.2])}  # fmt: skip
    reach = library_reach(names, vectors, gram, k=2, temperature=0.05)
    d = reach["per_category"]["d"]
    assert d["span_oracle"] == pytest.approx(1.0)
    assert d["nn1"] == pytest.approx(float(cosine_from_gram(gram)[3, 0]))  # d's nearest vector is a's
    assert d["best_single_oracle"] >= d["nn1"]
    for cell in reach["per_category"].values():
        assert all(-1 - 1e-9 <= v <= 1 + 1e-9 for v in cell.values())
        assert cell["span_oracle"] >= max(cell["mean_lora"], cell["nn1"], cell["knn_softmax"]) - 1e-9
    assert reach["mean"]["span_oracle"] == pytest.approx(
        sum(c["span_oracle"] for c in reach["per_category"].values()) / 4
    )


def test_ranks_average_ties_and_spearman_is_rank_based():
    assert rank([3.0, 1.0, 3.0, 2.0]) == [3.5, 1.0, 3.5, 2.0]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 1000]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2], [1, 2]) is None
    assert spearman([1, 1, 1], [1, 2, 3]) is None


def _matrix(points: list[float]) -> list[list[float]]:
    return [[-abs(a - b) for b in points] for a in points]


def test_mantel_finds_a_shared_structure_and_not_an_unrelated_one():
    g = torch.Generator().manual_seed(0)
    points = torch.rand(12, generator=g).tolist()
    related = mantel(_matrix(points), _matrix([2 * p + 1 for p in points]), permutations=199)
    assert related["spearman"] == pytest.approx(1.0)
    assert related["p_value"] <= 0.01
    assert related["pairs"] == 12 * 11 // 2
    unrelated = mantel(_matrix(points), _matrix(torch.rand(12, generator=g).tolist()), permutations=199)
    assert unrelated["p_value"] > 0.05


def test_mantel_over_ordered_pairs_skips_missing_cells():
    a = [[0.0, 1.0, 2.0], [3.0, 0.0, 4.0], [5.0, 6.0, 0.0]]
    b = [[None, 1.0, 2.0], [3.0, None, None], [5.0, 6.0, None]]
    result = mantel(a, b, permutations=9, symmetric=False)
    assert result["pairs"] == 5
    assert result["spearman"] == pytest.approx(1.0)


def test_neighbour_transfer_reports_the_nearest_against_the_best():
    names = ["a", "b", "c"]
    similarity = torch.tensor([[1.0, 0.9, 0.1], [0.9, 1.0, 0.2], [0.1, 0.2, 1.0]])
    share = {
        "a": {"a": 1.0, "b": 0.2, "c": 0.6},
        "b": {"a": 0.5, "b": 1.0, "c": 0.1},
        "c": {"a": None, "b": None, "c": None},  # own LoRA did not beat the base model: left out
    }
    result = neighbour_transfer(names, similarity, share)
    assert result["targets"] == 2
    assert result["per_target"]["a"] == {
        "nearest": "b", "nearest_share": 0.2, "best": "c", "best_share": 0.6, "median_share": 0.4, "nearest_rank": 2,
    }  # fmt: skip
    assert result["per_target"]["b"]["nearest_rank"] == 1
    assert result["nearest_is_best"] == 0.5
    assert result["mean_best_share"] == pytest.approx(0.55)


def test_family_contrast():
    names = ["a", "b", "c"]
    similarity = torch.tensor([[1.0, 0.8, 0.1], [0.8, 1.0, 0.3], [0.1, 0.3, 1.0]])
    contrast = family_contrast(names, similarity, {"a": "prose", "b": "prose", "c": "code"})
    assert contrast["within"] == pytest.approx(0.8)
    assert contrast["across"] == pytest.approx(0.2)


def test_condition_geometry_links_vectors_that_predict_adapters():
    """Adapters whose weight change is an isometric image of the task vector (dW = B0 @ A(v), B0 with orthonormal
    columns, A linear with orthonormal rows): adapter cosines equal vector cosines, so the correlation is 1; random
    vectors give a much weaker one. Categories missing a vector or an adapter are left out."""
    g = torch.Generator().manual_seed(1)
    names = [f"cat{i}" for i in range(10)]
    latent = torch.randn(10, 3, generator=g)
    rows = torch.linalg.qr(torch.randn(12, 3, generator=g))[0].T  # [3, 12], orthonormal rows
    b0 = torch.linalg.qr(torch.randn(5, 2, generator=g))[0]  # [5, 2], orthonormal columns
    adapters = {
        name: lora_factors({"m.lora_A.weight": (latent[i] @ rows).reshape(2, 6), "m.lora_B.weight": b0}, CONFIG)
        for i, name in enumerate(names)
    }
    matched = condition_geometry({n: latent[i] for i, n in enumerate(names)}, adapters, permutations=199)
    noise = condition_geometry(
        {n: torch.randn(3, generator=g) for n in names} | {"extra": torch.randn(3)}, adapters, permutations=199
    )
    assert matched["categories"] == names and noise["categories"] == names
    assert matched["vector_vs_adapter"]["spearman"] == pytest.approx(1.0)
    assert matched["vector_vs_adapter"]["p_value"] <= 0.01
    assert noise["vector_vs_adapter"]["spearman"] < 0.9
    assert len(matched["matrices"]["adapter_cosine"]) == 10
    assert "retrieval" not in matched


def test_condition_geometry_with_the_transfer_matrix_and_families():
    names = ["a", "b", "c", "d"]
    points = ([1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9])
    vectors = {n: torch.tensor(v) for n, v in zip(names, points, strict=True)}
    adapters = {n: lora_factors(_state(i), CONFIG) for i, n in enumerate(names)}
    share = {t: {s: 1.0 if s == t else (0.8 if {s, t} in ({"a", "b"}, {"c", "d"}) else 0.1) for s in names}
             for t in names}  # fmt: skip
    result = condition_geometry(vectors, adapters, share, {"a": "x", "b": "x", "c": "y", "d": "y"}, permutations=99)
    assert result["retrieval"]["by_task_vector"]["nearest_is_best"] == 1.0
    assert result["retrieval"]["by_task_vector"]["mean_nearest_share"] == pytest.approx(0.8)
    assert result["vector_vs_transfer"]["pairs"] == 12
    assert result["vector_vs_transfer"]["spearman"] > 0.5
    assert result["families"]["vector_cosine"]["within"] > result["families"]["vector_cosine"]["across"]


def test_too_few_categories_is_a_clear_error():
    with pytest.raises(ValueError, match="at least 3 categories"):
        condition_geometry({"a": torch.ones(2)}, {"a": lora_factors(_state(0), CONFIG)})
