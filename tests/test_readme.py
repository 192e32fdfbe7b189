"""README.md runs as written: every command and code block, in order, in a copy of the repository.

The copy uses this checkout's virtual environment and the tiny test model (``ICM_LORA_CONFIG`` names a config file,
as a user's machine may), so ``make demo``, the pipeline on the README's own categories, ``generate``, the Python
snippet and the deployment commands run verbatim in minutes. ``make test`` is the one line not run here: it is this
test suite, which CI runs (``.ci/run``). The other checks keep the README short, its paths and links real and its
prose free of commit references.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests import helpers
from tests.flows.support import tiny_run_config


REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
BLOCK = re.compile(r"(?:<!-- file: (?P<file>\S+) -->\n)?```(?P<lang>\w+)\n(?P<body>.*?)```", re.S)
NOT_RUN_HERE = {"make test": "the test suite itself: CI runs it (.ci/run)"}
"""README lines this test does not run, and why."""


def blocks() -> list[dict[str, str | None]]:
    return [m.groupdict() for m in BLOCK.finditer(README.read_text(encoding="utf-8"))]


def command(line: str) -> str:
    """A shell line without its trailing comment."""
    return re.sub(r"\s+#.*$", "", line).strip()


# --------------------------------------------------------------------------------------------------
# Cheap checks
# --------------------------------------------------------------------------------------------------


def test_readme_is_short():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 150


def test_no_commit_references_in_readme_and_docs():
    offenders = []
    for path in [README, *sorted((REPO / "docs").glob("*.md"))]:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if re.search(r"`[0-9a-f]{7,40}`", line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()[:100]}")
    assert not offenders, "provenance belongs in the results' READMEs:\n" + "\n".join(offenders)


def test_every_block_is_one_this_test_runs():
    found = blocks()
    assert {b["lang"] for b in found} <= {"bash", "python", "yaml", "text"}, [b["lang"] for b in found]
    assert all(b["file"] for b in found if b["lang"] == "yaml"), "a yaml block needs <!-- file: NAME --> above it"
    bash = [command(line) for b in found if b["lang"] == "bash" for line in b["body"].splitlines()]
    assert set(NOT_RUN_HERE) <= set(bash), "NOT_RUN_HERE names a line the README no longer has"


def test_ci_runs_the_readmes_test_command():
    assert "make test" in (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()


def test_paths_and_links_exist():
    text = README.read_text(encoding="utf-8")
    missing = [link for link in re.findall(r"\]\(([^)#:]+)\)", text) if not (REPO / link).exists()]
    layout = [b["body"] for b in blocks() if b["lang"] == "text"][-1]  # a folder per line, then what is in it
    folder = REPO
    for line in layout.splitlines():
        if line and not line[0].isspace():
            folder = REPO / line.split()[0]
        for token in re.findall(r"[\w./-]+", line):
            if token.endswith(("/", ".py", ".md")) and not (REPO / token).exists() and not (folder / token).exists():
                missing.append(f"{token} (in {folder.relative_to(REPO)})")
    assert not missing, missing


def test_inline_commands_exist():
    """``icm-lora X`` and ``make X`` named in the prose are real commands and targets."""
    from flows.cli import COMMANDS

    text = README.read_text(encoding="utf-8")
    for name in re.findall(r"`icm-lora ([a-z][a-z-]*)", text):
        assert name in {c.split()[0] for c in COMMANDS}, name
    targets = re.findall(r"^([a-z-]+):", (REPO / "Makefile").read_text(encoding="utf-8"), re.M)
    for name in re.findall(r"`make ([a-z-]+)`", text) + re.findall(r"^make ([a-z-]+)", text, re.M):
        assert name in targets, name


# --------------------------------------------------------------------------------------------------
# Everything, run
# --------------------------------------------------------------------------------------------------


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture
def workspace(tmp_path: Path, tiny_base_dir: Path) -> tuple[Path, dict[str, str]]:
    """A copy of the repository's tracked files that uses this checkout's venv, and the environment a user's
    machine would have, with the tiny model as its configured model."""
    venv = Path(sys.executable).parents[1]
    installed = venv / "bin" / ".installed"
    if not installed.is_file():
        pytest.skip(f"{venv} was not made by `make install`; `make demo` would install a new one")
    work = tmp_path / "checkout"
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    for name in tracked.split():
        if (REPO / name).is_file():
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, work / name)
    (work / ".venv").symlink_to(venv)
    stamp = installed.stat().st_mtime - 60  # the install is newer than the files it was made from: make reuses it
    for name in ("Makefile", "pyproject.toml", "requirements.lock"):
        os.utime(work / name, (stamp, stamp))
    for name, text in {"legal": helpers.SAMPLE_TEXT, "recipes": helpers.OTHER_TEXT}.items():
        folder = work / "data" / name  # the text the README asks users to put there
        folder.mkdir(parents=True)
        for i in range(8):
            (folder / f"doc-{i}.txt").write_text(f"Document {i}.\n\n{text}\n", encoding="utf-8")
    config = tiny_run_config(tiny_base_dir).model_copy(
        update={"data": tiny_run_config(tiny_base_dir).data.model_copy(update={"max_chars": 20_000})}
    )
    config_file = tmp_path / "machine.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json")), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        ICM_LORA_CONFIG=str(config_file),
        ICM_LORA_HOME=str(work),  # where a worker runs deployments from (flows/deploy_steps.py)
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180",
        DO_NOT_TRACK="1",
        HF_HUB_OFFLINE="1",
    )
    return work, env


def run_block(body: str, work: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    script = "\n".join(line for line in body.splitlines() if command(line) not in NOT_RUN_HERE)
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=1200
    )


@pytest.mark.slow
def test_readme_runs_verbatim(workspace):
    work, env = workspace
    assert port_free(4200), "port 4200 is taken; the README's deployment commands start a Prefect server there"
    ran = []
    try:
        for block in blocks():
            lang, body = block["lang"], block["body"]
            if lang == "yaml":
                (work / block["file"]).write_text(body, encoding="utf-8")
                continue
            if lang == "text":
                continue
            if lang == "bash":
                result = run_block(body, work, env)
            else:  # python: a fresh interpreter, nothing of the project imported
                code = [sys.executable, "-c", body]
                result = subprocess.run(code, cwd=work, env=env, capture_output=True, text=True, timeout=600)
            output = f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-5000:]}"
            assert result.returncode == 0, f"{body}\n{output}"
            ran.append((body, result.stdout))
    finally:
        subprocess.run([str(work / ".venv" / "bin" / "prefect"), "server", "stop"], cwd=work, env=env,
                       capture_output=True, timeout=120)  # fmt: skip

    demo = next(out for body, out in ran if "make demo" in body)
    adapters = re.findall(r"^\s{2}\S+\s+(\S+/adapter)$", demo.split("adapters:")[-1], re.M)
    assert len(adapters) == 5 and all((work / a).is_dir() or Path(a).is_dir() for a in adapters), demo[-2000:]
    assert (work / "adapters" / "legal" / "adapter_config.json").is_file()
    served = list((work / "artifacts" / "generated").glob("*/category-legal/*/adapter/adapter_config.json"))
    assert served, "the generate-adapter deployment run wrote no adapter"
