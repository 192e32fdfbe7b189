"""Bad input through ``icm-lora pipeline``: a clear error naming the file or field, a non-zero exit
status (2: refused before any flow run; 1: the run failed), and nothing half-written under the root."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flows.cli import main as cli_main
from tasks.manifest import valid_output
from tests.flows.crash import check_visible_files, hidden_leftovers, output_folders
from tests.flows.support import recipe_text, write_categories


def main(argv: list[str]) -> int:
    """``icm-lora pipeline ARGV``."""
    return cli_main(["pipeline", *argv])


def pipeline_args(workspace, config: Path, categories: Path, *extra: str) -> list[str]:
    return ["--root", str(workspace.root), "--config", str(config), "--categories", str(categories), *extra]


@pytest.fixture
def config_file(workspace, tmp_path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(workspace.config.model_dump(mode="json")), encoding="utf-8")
    return path


def refused_before_run(workspace, capsys, argv: list[str], *mentions: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("icm-lora pipeline: error: ") and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    for text in mentions:
        assert text in err, err
    assert not workspace.root.exists(), "a refused run wrote to the artifacts root"


def test_unknown_config_field(workspace, config_file, capsys):
    argv = pipeline_args(workspace, config_file, workspace.categories_file, "--set", "cvae.epochz=3")
    refused_before_run(workspace, capsys, argv, str(config_file), "cvae.epochz")


def test_duplicate_category_names(workspace, config_file, tmp_path, capsys):
    cats = tmp_path / "dup" / "categories.yaml"
    write_categories(cats.parent, {"recipes": recipe_text()})
    entries = yaml.safe_load(cats.read_text())["categories"]
    cats.write_text(yaml.safe_dump({"categories": entries * 2}))
    refused_before_run(workspace, capsys, pipeline_args(workspace, config_file, cats), str(cats), "duplicate")


@pytest.mark.parametrize("name", ["../evil", "a/b"])
def test_category_name_with_path_parts(workspace, config_file, tmp_path, capsys, name):
    cats = write_categories(tmp_path / "names", {"recipes": recipe_text()})
    entries = yaml.safe_load(cats.read_text())["categories"]
    entries[0]["name"] = name
    cats.write_text(yaml.safe_dump({"categories": entries}))
    refused_before_run(workspace, capsys, pipeline_args(workspace, config_file, cats), str(cats), repr(name))


@pytest.mark.parametrize("problem", ["missing", "empty", "blank"])
def test_missing_or_empty_source_is_refused_before_any_run(workspace, config_file, tmp_path, capsys, problem):
    cats = write_categories(tmp_path / problem, {"recipes": recipe_text(), "notes": "placeholder"})
    if problem == "missing":
        (tmp_path / problem / "notes.txt").unlink()
    else:
        (tmp_path / problem / "notes.txt").write_text("" if problem == "empty" else "  \n\n \t\n")
    argv = pipeline_args(workspace, config_file, cats)
    refused_before_run(workspace, capsys, argv, "'notes'", str(tmp_path / problem / "notes.txt"))


def failed_run_left_nothing_half_written(root: Path) -> None:
    """After a failed run: every output folder is either complete (valid manifest) or holds no file at all."""
    check_visible_files(root)
    for folder in output_folders(root):
        if valid_output(folder) is None:
            assert not [p for p in folder.rglob("*") if p.is_file()], f"{folder}: partial output left"
    assert hidden_leftovers(root) == []


def test_too_little_text_fails_the_run_naming_the_category(workspace, config_file, tmp_path, capsys):
    cats = write_categories(
        tmp_path / "short", {"recipes": recipe_text(), "tiny-notes": "Two lines.\n\nThat is all.\n"}
    )
    assert main(pipeline_args(workspace, config_file, cats)) == 1
    err = capsys.readouterr().err
    assert "icm-lora pipeline: error: run failed: stage prepare-data failed for tiny-notes" in err
    assert f"at least {workspace.config.data.min_chars}" in err and str(tmp_path / "short" / "tiny-notes.txt") in err
    assert not (workspace.root / "lora").exists()
    failed_run_left_nothing_half_written(workspace.root)


def test_unknown_model_fails_the_run_naming_the_model(workspace, config_file, capsys):
    argv = pipeline_args(
        workspace, config_file, workspace.categories_file, "--set", "model.name_or_path=no-such-org/no-model"
    )
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "stage finetune-lora failed" in err and "'no-such-org/no-model'" in err, err
    assert not list(workspace.root.glob("lora/*/*/manifest.json"))
    failed_run_left_nothing_half_written(workspace.root)


def test_bad_input_is_not_retried():
    """Stages retry transient failures once; bad input fails at once (a retry would only repeat the error)."""
    from prefect.states import Failed

    from icm_core.data.text import DataError
    from icm_core.infra.io import ArtifactError
    from icm_core.models.identity import ModelLoadError
    from tasks.stage import retry_unless_bad_input

    for error in (ModelLoadError("m"), DataError("d"), ArtifactError("a"), ValueError("v"), FloatingPointError("f")):
        assert not retry_unless_bad_input(None, None, Failed(data=error)), error
    for error in (OSError("disk full"), RuntimeError("CUDA out of memory"), MemoryError()):
        assert retry_unless_bad_input(None, None, Failed(data=error)), error
