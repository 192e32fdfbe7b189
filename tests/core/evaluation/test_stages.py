"""Tests of icm_core.evaluation.stages: the evaluation every flow uses, per test block."""

from __future__ import annotations

import pytest
import torch

from tests import helpers


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
