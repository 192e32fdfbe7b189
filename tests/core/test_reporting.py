"""Result tables, storage accounting against real file sizes, and the report figures."""

from __future__ import annotations

import pytest
import torch

from icm_core.io import csv_text
from icm_core.plots import pca_2d, plot_main_bars, plot_task_vectors, plot_training_curves
from icm_core.reporting import (
    gain_table,
    main_table,
    mean_row,
    ordered_methods,
    result_rows,
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
    for title in ("Original model", "Original LoRA", "Model Soup", "COND P-DIFF", "ICM-LoRA"):
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
