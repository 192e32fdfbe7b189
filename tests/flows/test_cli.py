"""The one command line, ``icm-lora`` (flows/cli.py): every job is a subcommand, ``--help`` / ``--version``
load no torch or Prefect, bad input is one line and exit status 2 before any flow run, and the
``python -m flows.*`` entry points are aliases of it. (Start-up time is measured by scripts/bench_cli.py.)"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import icm_core
from flows.cli import COMMANDS, FLOW_COMMANDS, build_parser, main
from icm_core.cli import STAGE_COMMANDS


REPO = Path(__file__).resolve().parents[2]
# Nothing listens here: a command that reached a Prefect API (or started a flow run) would fail differently.
NO_SERVER = {"PREFECT_API_URL": "http://127.0.0.1:9/api", "ICM_DEVICE": ""}


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse exits for --help, --version and usage errors
        return 0 if exc.code is None else int(exc.code)


def _cli(*argv: str, cwd: Path = REPO, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **NO_SERVER, **env}
    code = "import sys; from flows.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *argv], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=300
    )


def _one_line_error(result: subprocess.CompletedProcess, command: str) -> str:
    err = result.stderr.strip()
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], err[-3000:])
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"icm-lora {command}: error: "), err
    return err


def test_every_command_of_the_table_is_a_subcommand():
    """The parser is built from one table: every entry is a command, and nothing else is."""
    assert COMMANDS == {**FLOW_COMMANDS, **STAGE_COMMANDS}
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted({name.split()[0] for name in COMMANDS})
    registry = next(a for a in sub.choices["registry"]._actions if a.dest == "registry_command")
    assert sorted(registry.choices) == ["retrain", "scan"]


@pytest.mark.parametrize("command", [name.split() for name in COMMANDS])
def test_subcommand_help(command, capsys):
    assert _exit_code([*command, "--help"]) == 0
    assert f"icm-lora {' '.join(command)}" in capsys.readouterr().out


def test_version_is_the_one_version_string(capsys):
    assert _exit_code(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"icm-lora {icm_core.__version__}"
    assert importlib.metadata.version("icm-lora") == icm_core.__version__  # pyproject reads the same string


def test_help_and_version_import_no_torch_or_prefect():
    code = (
        "import sys; from flows.cli import main\n"
        "for argv in (['--help'], ['--version'], ['pipeline', '--help'], ['registry', 'scan', '--help']):\n"
        "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'prefect') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "HEAVY []"


def test_usage_errors_exit_2(capsys):
    assert _exit_code([]) == 2
    assert _exit_code(["no-such-command"]) == 2
    assert _exit_code(["generate"]) == 2  # one of --category / --description / --task-vector is required
    assert _exit_code(["registry"]) == 2
    assert "required" in capsys.readouterr().err


@pytest.mark.parametrize("problem", ["missing", "empty"])
def test_bad_category_source_is_refused_before_any_flow_run(tmp_path, problem):
    (tmp_path / "news.txt").write_text("" if problem == "empty" else "unused")
    source = "news.txt" if problem == "empty" else "gone.txt"
    (tmp_path / "cats.yaml").write_text(f"categories:\n  - name: news\n    source: {source}\n    description: d\n")
    result = _cli("pipeline", "--categories", str(tmp_path / "cats.yaml"), "--root", str(tmp_path / "root"))
    err = _one_line_error(result, "pipeline")
    assert "'news'" in err and str(tmp_path / source) in err
    assert ("empty" if problem == "empty" else "does not exist") in err
    assert not (tmp_path / "root").exists()


def test_generate_without_a_pipeline_run_is_one_line(tmp_path):
    err = _one_line_error(_cli("generate", "--category", "news", "--root", str(tmp_path)), "generate")
    assert "latest.json" in err and "icm-lora pipeline" in err


def test_generate_with_a_missing_task_vector_file(tmp_path):
    err = _one_line_error(_cli("generate", "--task-vector", str(tmp_path / "tv.safetensors")), "generate")
    assert "tv.safetensors" in err


def test_generate_from_a_missing_text_folder_or_file_names_it(tmp_path):
    err = _one_line_error(_cli("generate", "--text-dir", str(tmp_path / "new-category")), "generate")
    assert f"--text-dir {tmp_path / 'new-category'}: no such folder" in err
    err = _one_line_error(_cli("generate", "--text", str(tmp_path / "notes.txt")), "generate")
    assert f"--text {tmp_path / 'notes.txt'}: no such file" in err
    (tmp_path / "notes.txt").write_text("some text")
    err = _one_line_error(_cli("generate", "--text", str(tmp_path / "notes.txt"), "--samples", "0"), "generate")
    assert "--samples" in err
    assert not (tmp_path / "artifacts").exists()


@pytest.mark.parametrize(
    ("kind", "message"),
    [("hidden_state:finetuned:smollm2-135m", "task_vector.hidden_from=base"), ("description:minilm", "--description")],
)
def test_generate_from_text_refuses_a_generator_of_another_kind_before_any_run(tmp_path, kind, message):
    """The kind check reads only the generator's sidecar, so it runs before the text is read or a model loads (the
    refusal with a real trained generator: tests/flows/test_generate.py); exit status 2, nothing written."""
    generator = tmp_path / "generator.safetensors"
    generator.write_bytes(b"not read by the kind check")
    sidecar = {
        "file": generator.name,
        "sha256": "0" * 64,
        "meta": {"kind": "icm-lora-generator", "task_vector_kind": kind},
    }
    (tmp_path / "generator.json").write_text(json.dumps(sidecar))
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("Some text of a new category. " * 20)
    argv = ("generate", "--text-dir", str(tmp_path / "texts"), "--generator", str(generator), "--root", str(tmp_path))
    err = _one_line_error(_cli(*argv), "generate")
    assert message in err and str(generator) in err
    assert not (tmp_path / "generated").exists()


def test_a_device_this_machine_lacks_is_refused_naming_it(tmp_path):
    result = _cli("pipeline", "--set", "model.device=cuda:7", "--root", str(tmp_path / "root"))
    if result.returncode == 0:  # pragma: no cover - a machine with 8 GPUs
        pytest.skip("this machine has a cuda:7")
    err = _one_line_error(result, "pipeline")
    assert "'cuda:7'" in err
    result = _cli("pipeline", "--root", str(tmp_path / "root"), ICM_DEVICE="tpu:0")
    assert "'tpu:0'" in _one_line_error(result, "pipeline")


def test_bad_values_are_one_line(tmp_path):
    assert "--ranks" in _one_line_error(_cli("ablations", "--ranks", "1,x"), "ablations")
    err = _one_line_error(_cli("registry", "scan", "--registry", str(tmp_path / "nope")), "registry scan")
    assert str(tmp_path / "nope") in err
    assert "bogus" in _one_line_error(_cli("detect", "--set", "bogus.x=1"), "detect")


def test_module_entry_point_runs_the_cli():
    """``python -m flows.cli`` is ``icm-lora``; no flow module imports the CLI, so ``python -m flows.<flow>`` is not
    an entry point (it used to be an alias that executed its module twice)."""
    command = [sys.executable, "-m", "flows.cli", "pipeline", "--help"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "icm-lora pipeline" in result.stdout
