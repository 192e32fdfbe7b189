"""An unchanged pipeline run is answered from its record (flows/run_record.py), and only while it is valid."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from flows import run_record
from icm_core.data.registry import load_registry


REPO = Path(__file__).resolve().parents[2]


def _flow_runs() -> int:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return len(client.read_flow_runs(limit=200))


def _table(out: str) -> str:
    """The printed results table (without the status line above it)."""
    return out[out.index("category") : out.index("report:")]


def test_run_key_covers_what_the_stage_keys_cover(workspace, tmp_path, monkeypatch):
    cats = load_registry(str(workspace.categories_file))
    key = run_record.run_key(workspace.config, cats, None, str(workspace.root))
    assert key == run_record.run_key(workspace.config, cats, None, str(workspace.root))
    changed_cfg = workspace.config.model_copy(update={"seeds": 2})
    assert run_record.run_key(changed_cfg, cats, None, str(workspace.root)) != key
    assert run_record.run_key(workspace.config, cats, ["recipes"], str(workspace.root)) != key
    assert run_record.run_key(workspace.config, cats, None, str(tmp_path / "other")) != key
    # A user category's text is part of it: edit its source file in place, get another key.
    source = Path(next(c.source for c in cats if c.name == "recipes"))
    original = source.read_bytes()
    source.write_bytes(original + b"\n\nOne more recipe: toast.\n")
    assert run_record.run_key(workspace.config, cats, None, str(workspace.root)) != key
    source.write_bytes(original)
    # So is the code: of the stages (icm_core, tasks) and of the flows that compose them.
    monkeypatch.setattr(run_record, "code_fingerprint", lambda include_presentation: "other code")
    assert run_record.run_key(workspace.config, cats, None, str(workspace.root)) != key
    monkeypatch.undo()
    flows_copy = tmp_path / "flows"
    shutil.copytree(run_record.FLOWS_DIR, flows_copy)
    monkeypatch.setattr(run_record, "FLOWS_DIR", flows_copy)
    same = run_record.run_key(workspace.config, cats, None, str(workspace.root))
    (flows_copy / "pipeline.py").write_text("# another composition\n", encoding="utf-8")
    assert same == key and run_record.run_key(workspace.config, cats, None, str(workspace.root)) != key


def test_an_unchanged_run_is_answered_from_its_record(workspace, tmp_path, capsys):
    from flows.cli import main

    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(workspace.config.model_dump(mode="json")), encoding="utf-8")
    argv = ["pipeline", "--config", str(config_file), "--categories", str(workspace.categories_file)]
    argv += ["--root", str(workspace.root)]

    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "up to date" not in first
    [record] = (workspace.root / run_record.RECORDS).glob("*.json")
    runs = _flow_runs()

    # Unchanged: the recorded summary, no flow run, latest.json still points at it.
    assert main(argv) == 0
    second = capsys.readouterr().out
    assert "up to date" in second and str(record) in second
    assert _table(second) == _table(first)
    assert _flow_runs() == runs
    assert (workspace.root / "latest.json").is_file()
    # ...answered without loading torch, transformers or Prefect: a warm `make demo` costs the interpreter and the
    # hashing (issue 25's target: 2 s), in a process of its own so that nothing this test imported counts.
    probe = (
        "import sys; from flows.cli import main; code = main(sys.argv[1:]); "
        "print('heavy:', [m for m in ('torch', 'transformers', 'prefect') if m in sys.modules]); sys.exit(code)"
    )
    done = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "up to date" in done.stdout and "heavy: []" in done.stdout, done.stdout

    # --rerun goes through Prefect (every stage a cache hit) and prints the same table.
    assert main([*argv, "--rerun"]) == 0
    rerun = capsys.readouterr().out
    assert "up to date" not in rerun and _table(rerun) == _table(first)
    assert _flow_runs() == runs + 1

    # A lost output the summary points to: the record is not trusted, the flow rebuilds the adapter.
    listed = first.split("adapters:")[1].splitlines()
    adapter_dir = Path(next(line.split()[-1] for line in listed if line.strip().startswith("recipes ")))
    shutil.rmtree(adapter_dir.parent)
    assert main(argv) == 0
    rebuilt = capsys.readouterr().out
    assert "up to date" not in rebuilt and _table(rebuilt) == _table(first)
    assert (adapter_dir / "adapter_model.safetensors").is_file()
    assert _flow_runs() == runs + 2

    # A changed config is another run: the flow runs and a second record appears.
    other = workspace.config.model_copy(update={"sample": workspace.config.sample.model_copy(update={"seed": 3})})
    config_file.write_text(yaml.safe_dump(other.model_dump(mode="json")), encoding="utf-8")
    assert main(argv) == 0
    assert "up to date" not in capsys.readouterr().out
    assert len(list((workspace.root / run_record.RECORDS).glob("*.json"))) == 2
