"""Tests of icm_core.zeroshot.selector: held-out scoring on the samples, the split rule, ties, fitted candidates."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

from icm_core.lora.arithmetic import merged_delta
from icm_core.zeroshot.config import SelectorConfig
from icm_core.zeroshot.functional import base_weight_name
from icm_core.zeroshot.selector import Candidate, fold_indices, select_adapter
from tests import helpers


CONFIG = {"r": 2, "lora_alpha": 8.0, "target_modules": ["q_proj", "v_proj"], "peft_type": "LORA"}
FIXED = SelectorConfig(mix_top=0, finetune_steps=0)


def _state(seed: int, scale: float) -> dict[str, torch.Tensor]:
    raw = helpers.random_lora_state(helpers.tiny_model(), helpers.lora_config(rank=2), seed)
    return {k: scale * v for k, v in raw.items()}


def _whole_forward_nll(model, state, blocks) -> float:
    """Mean next-token NLL of the merged model by a whole forward pass (no prefix states)."""
    merged = copy.deepcopy(model)
    params = dict(merged.named_parameters())
    with torch.no_grad():
        for module, delta in merged_delta(state, CONFIG).items():
            params[base_weight_name(module)] += delta.float()
        logits = merged(input_ids=blocks).logits[:, :-1]
        return float(F.cross_entropy(logits.transpose(1, 2), blocks[:, 1:]))


@pytest.fixture(scope="module")
def setup():
    model = helpers.tiny_model(seed=1)
    blocks = helpers.char_blocks(helpers.SAMPLE_TEXT, 16)[:8]
    return model, blocks


def test_fold_indices_hold_out_every_block_once():
    folds = fold_indices(10, 3, seed=4)
    assert sorted(itertools.chain(*folds)) == list(range(10))
    assert [len(f) for f in folds] == [4, 3, 3]
    assert folds == fold_indices(10, 3, seed=4) != fold_indices(10, 3, seed=5)
    with pytest.raises(ValueError, match="cannot fill 3 folds"):
        fold_indices(2, 3, seed=0)


def test_scores_are_the_nll_of_the_merged_model_and_the_lowest_wins(setup):
    model, blocks = setup
    candidates = [Candidate(f"c{i}", "stored", _state(i, scale), CONFIG) for i, scale in enumerate((0.5, 0.02, 2.0))]
    selection = select_adapter(model, blocks, candidates, FIXED)
    expected = {c.name: _whole_forward_nll(model, c.state, blocks) for c in candidates}
    got = {row["name"]: row["nll"] for row in selection.scores}
    assert got == pytest.approx(expected, abs=1e-5)
    assert selection.winner.name == min(expected, key=expected.get)
    assert [row["nll"] for row in selection.scores] == sorted(got.values())
    assert all(len(row["fold_nll"]) == FIXED.splits for row in selection.scores)


def test_a_tie_goes_to_the_cheapest_candidate(setup):
    model, blocks = setup
    state = _state(3, 0.1)
    candidates = [Candidate("a-generator", "generator", state, CONFIG), Candidate("z-stored", "stored", state, CONFIG)]
    assert select_adapter(model, blocks, candidates, FIXED).winner.name == "z-stored"
    slightly_worse = {k: 1.5 * v for k, v in state.items()}
    candidates = [Candidate("gen", "generator", state, CONFIG), Candidate("lib", "stored", slightly_worse, CONFIG)]
    strict = select_adapter(model, blocks, candidates, FIXED.model_copy(update={"tie_nats": 0.0}))
    loose = select_adapter(model, blocks, candidates, FIXED.model_copy(update={"tie_nats": 10.0}))
    assert strict.winner.name == min(strict.scores, key=lambda r: r["nll"])["name"]
    assert loose.winner.name == "lib"


def test_fitted_candidates_are_cross_fitted_and_the_winner_refitted(setup):
    model, blocks = setup
    candidates = [Candidate(f"c{i}", "stored", _state(i, 0.3), CONFIG) for i in range(3)]
    cfg = SelectorConfig(mix_top=2, mix_trials=3, finetune_steps=4, finetune_lr=0.05, finetune_batch=4)
    before = [p.detach().clone() for p in model.parameters()]
    selection = select_adapter(model, blocks, candidates, cfg, finetune_from="c0")
    rows = {row["name"]: row for row in selection.scores}
    assert {"mix", "finetune"} <= set(rows)
    # The fine-tune starts from c0 and learns the samples: held out, it still beats its start.
    assert rows["finetune"]["nll"] < rows["c0"]["nll"]
    assert selection.winner.name == min(rows.values(), key=lambda r: (r["nll"], r["cost"]))["name"]
    assert rows["mix"]["cost"] > rows["c0"]["cost"]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # base untouched
    assert all(p.requires_grad for p in model.parameters())


def test_the_optional_candidates_are_skipped_past_the_budget(setup):
    model, blocks = setup
    candidates = [Candidate(f"c{i}", "stored", _state(i, 0.3), CONFIG) for i in range(2)]
    ticks = itertools.count(step=100.0)
    selection = select_adapter(
        model, blocks, candidates, SelectorConfig(budget_s=50.0), finetune_from="c0", clock=lambda: next(ticks)
    )
    assert selection.skipped == ["mix", "finetune"]
    assert {row["name"] for row in selection.scores} == {"c0", "c1"}


def test_bad_candidates_are_refused(setup):
    model, blocks = setup
    state = _state(0, 0.1)
    with pytest.raises(ValueError, match="unique names"):
        select_adapter(model, blocks, [Candidate("a", "stored", state, CONFIG)] * 2, FIXED)
    with pytest.raises(ValueError, match="unknown kind"):
        Candidate("a", "oracle", state, CONFIG)
    with pytest.raises(ValueError, match="not a candidate"):
        select_adapter(model, blocks, [Candidate("a", "stored", state, CONFIG)], SelectorConfig(), finetune_from="b")
