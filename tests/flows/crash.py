"""Run the pipeline's command line in a separate process that a test can SIGKILL, and check what a crash left.

Starting ``python -m flows.pipeline`` costs 5-15 s of imports (torch, transformers, peft, prefect) on the
shared two-core machines, longer than the tiny pipeline itself. So the fault tests fork each run from a
``multiprocessing`` fork server that has imported those modules once: every run is still a separate
process that runs ``icm-lora pipeline`` (``flows.cli.main``) from its argument list, talks to the Prefect API
over HTTP and dies by a real SIGKILL, with no cleanup in the test process. (tests/flows/test_resume.py and
tests/flows/test_concurrency.py start real ``python -m flows.pipeline`` processes.)
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import threading
from pathlib import Path

from safetensors.torch import load_file

from icm_core.infra.io import check_safetensors_file, sidecar_path, verify_file
from icm_core.infra.layout import STAGES
from tasks.manifest import MANIFEST, verify_manifest


PRELOAD = [
    "flows.cli",
    "flows.pipeline",
    "tasks.report",
    "icm_core.lora.stages",
    "icm_core.generator.stages",
    "icm_core.baselines.stages",
    "icm_core.evaluation.stages",
    "transformers",
    "transformers.models.llama.modeling_llama",
    "peft",
    "tests.flows.crash",
]
"""What the fork server imports once, before it forks any run."""

UNCATEGORISED = ("generator", "pdiff", "report", "ablation_report")


def _child(argv: list[str], api_url: str, results: str, env: dict[str, str], log: str) -> None:
    """Body of a forked run: its own log file, environment and Prefect settings, then the pipeline CLI."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(env)
    # Forking is only safe before any thread exists: the server must not have started one while importing.
    if threading.active_count() != 1:
        print(f"fork server had threads before the fork: {threading.enumerate()}", flush=True)
        os._exit(3)
    from prefect.settings import PREFECT_API_URL, PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

    from flows.cli import main

    with temporary_settings({PREFECT_API_URL: api_url, PREFECT_RESULTS_LOCAL_STORAGE_PATH: Path(results)}):
        code = main(["pipeline", *argv])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_pipeline_process(
    argv: list[str], api_url: str, results: Path, env: dict[str, str], log: Path, timeout: float = 300
) -> int:
    """Run ``icm-lora pipeline ARGV`` (``flows.cli.main``) in a process forked from the preloaded server; return its
    exit code (``-9`` when it died by SIGKILL)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    process = ctx.Process(target=_child, args=(argv, api_url, str(results), env, str(log)))
    process.start()
    process.join(timeout)
    if process.is_alive():
        process.kill()
        process.join()
        raise TimeoutError(f"pipeline process still running after {timeout} s; log:\n{log_tail(log)}")
    return process.exitcode


def log_tail(log: Path, chars: int = 4000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.is_file() else "(no log)"


def hidden(path: Path, root: Path) -> bool:
    """Whether a path under ``root`` is (inside) a dot-named entry: temporary files and folders, locks,
    Prefect's records. Readers never open these."""
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def output_folders(root: Path) -> list[Path]:
    """Every stage output folder under ``root``: ``<stage>/<category>/<key>`` or ``<stage>/<key>``."""
    folders = []
    for stage in STAGES:
        base = root / stage
        if not base.is_dir():
            continue
        for child in base.iterdir():
            if child.name.startswith(".") or not child.is_dir():
                continue
            if stage in UNCATEGORISED:
                folders.append(child)
            else:
                folders += [key for key in child.iterdir() if key.is_dir() and not key.name.startswith(".")]
    return sorted(folders)


def check_visible_files(root: Path) -> dict[str, int]:
    """Prove that no truncated or half-written file sits under a final (non-hidden) name.

    Every visible ``.safetensors`` file has a valid header and loads completely and, when it has a
    sidecar, matches the sidecar's sha256; every visible ``.json`` / ``.jsonl`` file parses; every
    manifest verifies. Returns counts per kind, so a test can see the scan looked at something.
    """
    counts = {"safetensors": 0, "json": 0, "jsonl": 0, "manifests": 0}
    for path in sorted(root.rglob("*")):
        if not path.is_file() or hidden(path, root):
            continue
        if path.suffix == ".safetensors":
            check_safetensors_file(path)
            load_file(str(path))
            if sidecar_path(path).is_file():
                verify_file(path)
            counts["safetensors"] += 1
        elif path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
            counts["json"] += 1
            if path.name == MANIFEST:
                verify_manifest(path.parent)
                counts["manifests"] += 1
        elif path.suffix == ".jsonl":
            for line in path.read_text(encoding="utf-8").splitlines():
                json.loads(line)
            counts["jsonl"] += 1
    return counts


def hidden_leftovers(root: Path) -> list[Path]:
    """Temporary files and folders (dot-named) a crash left, outside the root's own dot folders: Prefect's
    records, the locks and the model fingerprint records (artifacts/README.md)."""
    return sorted(
        p
        for p in root.rglob(".*")
        if p.relative_to(root).parts[0] not in (".prefect", ".locks", ".fingerprints") and not hidden(p.parent, root)
    )
