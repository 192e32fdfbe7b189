"""Result tables, storage accounting against real file sizes, and the report figures."""

from __future__ import annotations

import pytest
import torch

from icm_core.infra.io import csv_text
from icm_core.report.plots import pca_2d, plot_main_bars, plot_task_vectors, plot_training_curves
from icm_core.report.tables import (
    add_intervals,
    gain_table,
    interval_table,
    main_table,
    mean_row,
    ordered_methods,
    result_rows,
    seed_rows,
    storage_rows,
    storage_table,
)


SCORES = {
    "news": {
        "base": {"ppl": 50.0, "bpc": 1.3},
        "lora": {"ppl": 40.0, "bpc": 1.2},
        "model_soup": {"ppl": 45.0, "bpc": 1.25},
        "cond_pdiff": {"ppl": 42.0, "bpc": 1.22},
        "icm_lora": {"ppl": 40.4, "bpc": 1.201},
    },
    "code": {
        "base": {"ppl": 20.0, "bpc": 1.0},
        "lora": {"ppl": 20.0, "bpc": 1.0},  # no gain: gain recovered is undefined
        "model_soup": {"ppl": 21.0, "bpc": 1.01},
        "cond_pdiff": {"ppl": 20.5, "bpc": 1.005},
        "icm_lora": {"ppl": 20.0, "bpc": 1.0},
    },
}


def test_result_rows_gain_and_gap():
    rows = result_rows(SCORES)
    assert [r["category"] for r in rows] == ["code", "news"]
    news = rows[1]
    assert news["gain_model_soup"] == pytest.approx(0.5)
    assert news["gain_cond_pdiff"] == pytest.approx(0.8)
    assert news["gain_icm_lora"] == news["gain_recovered"] == pytest.approx(0.96)
    assert news["gap_icm_lora"] == pytest.approx(0.01)
    assert rows[0]["gain_icm_lora"] is None
    mean = mean_row(rows)
    assert mean["ppl_base"] == pytest.approx(35.0) and "gain_icm_lora" not in mean  # None is not averaged


def test_tables_render_every_method_and_category():
    rows = result_rows(SCORES)
    main = main_table(rows)
    for title in ("Original model", "Original LoRA", "Model Soup (all categories)", "COND P-DIFF", "ICM-LoRA"):
        assert f"| {title} |" in main
    assert "news PPL" in main and "mean PPL" in main
    gains = gain_table(rows)
    assert "| news | 50.0% | 80.0% | 96.0% |" in gains and "| code | n/a |" in gains
    assert csv_text(rows).splitlines()[0].startswith("category,ppl_base,ppl_lora")
    with pytest.raises(ValueError, match="unknown methods"):
        ordered_methods(["base", "magic"])


def test_storage_rows_match_file_sizes(tmp_path):
    def blob(name: str, size: int):
        path = tmp_path / name
        path.write_bytes(b"x" * size)
        return path

    rows = storage_rows(
        [blob("train-a.jsonl", 1000), blob("train-b.jsonl", 500)],
        [blob(f"ckpt-{i}.safetensors", 200) for i in range(10)],
        [blob("adapter-a.safetensors", 200), blob("adapter-b.safetensors", 200)],
        {"generator": [blob("gen.safetensors", 50), blob("gen.json", 10)]},
    )
    by_item = {r["item"]: r for r in rows}
    assert by_item["training text (train splits)"]["bytes"] == 1500
    assert by_item["all LoRA trajectory checkpoints"] == {
        "item": "all LoRA trajectory checkpoints",
        "files": 10,
        "bytes": 2000,
        "vs_checkpoints": 1.0,
    }
    assert by_item["generator"]["bytes"] == 60 and by_item["generator"]["vs_checkpoints"] == pytest.approx(0.03)
    assert "2,000" in storage_table(rows)
    with pytest.raises(FileNotFoundError, match="missing"):
        storage_rows([tmp_path / "nope"], [], [], {})


def test_pca_recovers_the_main_axis():
    points = torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [4.0, 0.1, 0.0], [6.0, 0.0, 0.0]])
    coords, shares = pca_2d(points)
    assert coords.shape == (4, 2) and shares[0] > 0.99
    assert torch.allclose(coords[:, 0].abs(), torch.tensor([3.0, 1.0, 1.0, 3.0]), atol=0.05)
    two, shares2 = pca_2d(points[:2])
    assert shares2[1] == 0.0 and float(two[:, 1].abs().max()) < 1e-6


def test_figures_are_written_as_png(tmp_path):
    vectors = {name: torch.randn(16) for name in ("a", "b", "c")}
    history = [{"epoch": e, "recon": 1.0 / (e + 1), "kld": 2.0} for e in range(5)]
    pdiff = {
        "autoencoder": [{"epoch": 0, "recon": 1.0}, {"epoch": 1, "recon": 0.5}],
        "ddpm": [{"step": 10, "loss": 0.9}],
    }
    paths = [
        plot_task_vectors(vectors, tmp_path / "tv.png"),
        plot_training_curves(history, pdiff, tmp_path / "curves.png"),
        plot_training_curves(history, None, tmp_path / "cvae-only.png"),
        plot_main_bars(result_rows(SCORES), tmp_path / "bars.png"),
    ]
    for path in paths:
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bars.png", "curves.png", "cvae-only.png", "tv.png"]


def _eval(ppl_per_token_nll: float, n: int = 24, seed: int = 0, offset: float = 0.0) -> dict:
    """An evaluation's metadata with per-block NLL sums: shared block difficulty + a method-specific offset."""
    import numpy as np

    rng = np.random.default_rng(seed)
    difficulty = np.random.default_rng(99).normal(0.0, 0.4, size=n)  # the same blocks for every method
    nll = (ppl_per_token_nll + difficulty + offset + rng.normal(0, 0.002, size=n)) * 127
    ppl = float(np.exp(nll.sum() / (127 * n)))
    return {"ppl": ppl, "bpc": ppl / 40, "block_nll": nll.tolist(), "block_tokens": [127] * n}


def test_seed_rows_mean_and_spread():
    seeds = [
        [{"category": "news", "ppl_lora": 40.0, "gain_icm_lora": 0.9, "adapter_dir": "x"}],
        [{"category": "news", "ppl_lora": 42.0, "gain_icm_lora": 1.0, "adapter_dir": "y"}],
        [{"category": "news", "ppl_lora": 44.0, "gain_icm_lora": 0.95, "adapter_dir": "z"}],
    ]
    [row] = seed_rows(seeds)
    assert row["ppl_lora"] == 42.0 and row["ppl_lora_sd"] == pytest.approx(2.0)
    assert row["gain_icm_lora"] == pytest.approx(0.95) and row["gain_icm_lora_sd"] == pytest.approx(0.05)
    assert row["adapter_dir"] == "x"  # not numeric: seed 0's
    [single] = seed_rows(seeds[:1])
    assert single["ppl_lora"] == 40.0 and "ppl_lora_sd" not in single


def test_intervals_in_rows_and_tables():
    seed0 = {
        "news": {
            "base": _eval(3.8, seed=1),
            "lora": _eval(3.7, seed=2),
            "icm_lora": _eval(3.7, seed=3),  # no real difference to the LoRA
            "model_soup": _eval(3.7, seed=4, offset=0.02),  # 2% worse per token
        }
    }
    seed1 = {
        "news": {
            m: _eval(3.7 + (0.1 if m == "base" else 0.02 if m == "model_soup" else 0.0), seed=10 + i)
            for i, m in enumerate(("base", "lora", "icm_lora", "model_soup"))
        }
    }
    per_seed = [result_rows(s) for s in (seed0, seed1)]
    rows = seed_rows(per_seed)
    add_intervals(rows, [seed0, seed1])
    [row] = rows
    assert row["verdict_vs_lora"]["model_soup"] == "worse" and row["ci95_vs_lora"]["model_soup"][0] > 0
    assert row["verdict_vs_lora"]["icm_lora"] == "no clear difference"
    low, high = row["ci95_vs_lora"]["icm_lora"]
    assert low < 0 < high and high - low < 0.01
    assert row["verdict_vs_base"]["lora"] == "better" and "lora" not in row["ci95_vs_lora"]
    table = interval_table(rows, "lora")
    assert "**worse**" in table and "(no clear difference)" in table and "Model Soup (all categories)" in table
    # Evaluations without per-block data (older artifacts) get no interval rather than a made-up one.
    seed0["news"]["icm_lora"] = {"ppl": 40.0, "bpc": 1.0}
    rows = seed_rows([result_rows(seed0)])
    add_intervals(rows, [seed0])
    assert "icm_lora" not in rows[0]["ci95_vs_lora"] and "model_soup" in rows[0]["ci95_vs_lora"]
