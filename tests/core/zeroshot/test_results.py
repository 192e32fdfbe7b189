"""Tests of icm_core.zeroshot.results: the gap metric, its intervals, the summary and the cross-category matrix."""

from __future__ import annotations

import pytest
import torch

from icm_core.zeroshot.results import bootstrap_gap, cross_category_matrix, gap_recovered, summarize


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


def test_summary_scores_the_selector_with_category_level_intervals_picks_and_regret():
    """Ten categories in two families: the selector equals the multi-task LoRA on half of them and the better mean
    LoRA on the others; every difference gets a category-level interval, the family tables and the sign test."""
    torch.manual_seed(1)
    nll, picks, families = {}, {}, {}
    for i in range(10):
        cat = f"c{i}"
        base = [3.0 + 0.1 * float(x) for x in torch.randn(8)]
        good = i % 2 == 0  # the mean LoRA helps on even categories, the multi-task LoRA on odd ones
        nll[cat] = {
            "base": base,
            "oracle": [b - 1.0 for b in base],
            "mean_lora": [b - (0.8 if good else 0.2) for b in base],
            "multitask_lora": [b - (0.3 if good else 0.6) for b in base],
            "icm_lora": [b - 0.1 for b in base],
            "selector": [b - (0.8 if good else 0.6) for b in base],
        }
        picks[cat] = "mean_lora" if good else "multitask_lora"
        families[cat] = "even" if good else "odd"
    summary = summarize(nll, [[f"c{i}" for i in range(5)], [f"c{i}" for i in range(5, 10)]], samples=200,
                        families=families, picks=picks)["summary"]  # fmt: skip
    assert summary["macro_gain"]["selector"] == pytest.approx(0.7)
    assert summary["win_rate"]["selector_vs_multitask_lora"] == pytest.approx(0.75)  # 5 wins, 5 ties
    cell = summary["ci95_category"]["multitask_lora_minus_selector"]
    assert cell["difference"] == pytest.approx(-0.25) and cell["ci95"][1] < 0 and cell["verdict"] == "worse"
    assert cell["sign_test"] == {"positive": 0, "negative": 5, "p": pytest.approx(2 / 32)}
    assert summary["ci95_category"]["mean_lora_minus_selector"]["difference"] == pytest.approx(-0.2)
    odd = summary["family_ci95_category"]["odd"]
    assert odd["categories"] == 5 and odd["differences"]["multitask_lora_minus_selector"]["difference"] == 0
    assert summary["selector"]["picks"] == {"mean_lora": 5, "multitask_lora": 5}
    assert summary["selector"]["mean_regret"] == pytest.approx(0.0)
