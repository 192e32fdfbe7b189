"""The leave-out report's files: an interim report over the folds done so far, superseded by the final one."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from icm_core.report.zeroshot import interim_dir, write_results
from icm_core.zeroshot.results import summarize


FOLDS = [["a", "b", "c"], ["d", "e"]]


def _nll(categories: list[str]) -> dict[str, dict[str, list[float]]]:
    base = [3.0, 3.1, 2.9, 3.2]
    return {
        cat: {
            "base": base,
            "oracle": [b - 1 for b in base],
            "mean_lora": [b - 0.3 for b in base],
            "icm_lora": [b - 0.2 - 0.05 * i for b in base],
        }
        for i, cat in enumerate(categories)
    }


def _write(out: Path, nll: dict[str, dict[str, list[float]]]) -> dict[str, str]:
    result = summarize(nll, FOLDS, samples=20)
    mean_nll = {c: {m: sum(v) / len(v) for m, v in by.items()} for c, by in nll.items()}
    vectors = {c: torch.randn(8, generator=torch.Generator().manual_seed(i)) for i, c in enumerate("abcde")}
    return write_results(out, result, FOLDS, mean_nll, {}, vectors, {}, {"bootstrap_samples": 20})


def test_an_interim_report_says_what_it_covers_and_the_final_report_removes_it(tmp_path: Path) -> None:
    _write(interim_dir(tmp_path), _nll(["d", "e"]))  # fold 1 scored, fold 0 not yet
    report = (interim_dir(tmp_path) / "report.md").read_text()
    assert "Interim report: 1 of 2 folds scored" in report and "(2 of 5 held-out categories)" in report
    summary = json.loads((interim_dir(tmp_path) / "summary.json").read_text())
    assert summary["folds_evaluated"] == 1 and summary["complete"] is False

    _write(tmp_path, _nll(list("abcde")))
    assert not interim_dir(tmp_path).exists()
    assert "Interim" not in (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "summary.json").read_text())["complete"] is True


def test_an_interim_report_leaves_a_final_report_beside_it_alone(tmp_path: Path) -> None:
    _write(tmp_path, _nll(list("abcde")))
    _write(interim_dir(tmp_path), _nll(["a", "b", "c"]))  # a rerun's first fold, beside the old final results
    assert json.loads((tmp_path / "summary.json").read_text())["complete"] is True
    assert json.loads((interim_dir(tmp_path) / "summary.json").read_text())["folds_evaluated"] == 1
