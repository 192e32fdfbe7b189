"""Tests of the ``icm-lora`` / ``python -m icm_core`` command line (in-process where possible)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from icm_core.cli import build_parser, main


REPO = Path(__file__).resolve().parents[2]
SUBCOMMANDS = [
    "categories",
    "config",
    "prepare-data",
    "finetune",
    "task-vector",
    "train-generator",
    "sample",
    "adapt",
    "evaluate",
    "in-process",
]


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse exits for --help and usage errors
        return 0 if exc.code is None else int(exc.code)


def test_subcommand_list_is_complete():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted(SUBCOMMANDS)


def test_top_level_help(capsys):
    assert _exit_code(["--help"]) == 0
    out = capsys.readouterr().out
    assert "icm-lora" in out
    for name in SUBCOMMANDS:
        assert name in out


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_subcommand_help(command, capsys):
    assert _exit_code([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert f"icm-lora {command}" in out
    assert "--config" in out and "--set" in out


@pytest.mark.slow
def test_module_entry_point_runs():
    result = subprocess.run(
        [sys.executable, "-m", "icm_core", "--help"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "train-generator" in result.stdout


def test_config_prints_json_with_overrides(capsys):
    code = main(["config", "--set", "lora.steps=3", "--set", "lora.trajectory_size=1", "--set", "cvae.epochs=2"])
    assert code == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["lora"]["steps"] == 3
    assert payload["lora"]["trajectory_size"] == 1
    assert payload["cvae"]["epochs"] == 2
    sections = {"model", "data", "lora", "task_vector", "cvae", "sample", "eval", "methods", "soup", "pdiff"}
    sections |= {"seeds", "diagnostics", "resume", "serving"}
    assert set(payload) == sections


def test_config_reads_a_file(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("sample:\n  seed: 11\n")
    assert main(["config", "--config", str(path), "--set", "eval.batch_size=2"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["sample"]["seed"] == 11 and payload["eval"]["batch_size"] == 2


def test_config_steps_below_trajectory_is_an_error(capsys):
    # The default trajectory (10 checkpoints every 2 steps) needs 20 steps; fewer is refused, not truncated.
    assert main(["config", "--set", "lora.steps=3"]) == 2
    err = capsys.readouterr().err
    assert "trajectory_size" in err and "steps = 3" in err


def test_unknown_field_exit_code_and_message(capsys):
    assert main(["config", "--set", "lora.bogus=1"]) == 2
    captured = capsys.readouterr()
    assert "bogus" in captured.err
    assert captured.out == ""


def test_bad_override_and_missing_file(tmp_path, capsys):
    assert main(["config", "--set", "lora.steps"]) == 2
    assert "section.field=value" in capsys.readouterr().err
    assert main(["config", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err


def test_usage_errors_exit_2(capsys):
    assert _exit_code([]) == 2
    assert _exit_code(["no-such-command"]) == 2
    assert _exit_code(["prepare-data"]) == 2  # --category and --out are required
    assert "required" in capsys.readouterr().err


def test_sample_needs_a_category_or_vector(tmp_path, capsys):
    code = main(["sample", "--generator", str(tmp_path / "g.safetensors"), "--out", str(tmp_path / "a")])
    assert code == 2
    assert "--category or --task-vector" in capsys.readouterr().err


def test_train_generator_pairs_are_checked(tmp_path, capsys):
    code = main(["train-generator", "--lora", "nopath", "--task-vector", "a=b", "--out", str(tmp_path / "g")])
    assert code == 2
    assert "CATEGORY=PATH" in capsys.readouterr().err
