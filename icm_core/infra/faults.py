"""Named crash points for the fault-injection tests: a test can SIGKILL this process at any of them.

The code calls :func:`fault_point` where a crash is interesting: between writing a temporary file and
renaming it into place, between an artifact and its manifest, inside the training and evaluation loops.
With ``ICM_FAULT_KILL_AT`` and ``ICM_FAULT_TRACE`` unset (always, outside tests) a call is two
environment lookups and a return.

``ICM_FAULT_KILL_AT="<point>[@<glob>][#<n>][~torn]"`` kills the process with SIGKILL (no cleanup, no
``finally`` blocks, no flush: the same as a power cut for this process) at the ``n``-th hit (default 1)
of ``point`` whose target path matches ``glob`` (``fnmatch`` on the POSIX path; default any).
``~torn`` first truncates the point's temporary file to half its size, as a crash in the middle of
writing it would leave it.

``ICM_FAULT_MARKER=<file>``: the line ``<point> <target>`` is appended (and fsynced) just before the
kill, so a test can prove the kill happened at the point it asked for.

``ICM_FAULT_TRACE=<file>``: every hit of every point appends ``<unix time> <pid> <point> <target>``;
tests count lines in it (how many times a stage body ran across processes, say).
"""

from __future__ import annotations

import fnmatch
import os
import signal
import threading
import time
from pathlib import Path


KILL_ENV = "ICM_FAULT_KILL_AT"
MARKER_ENV = "ICM_FAULT_MARKER"
TRACE_ENV = "ICM_FAULT_TRACE"

POINTS: dict[str, str] = {
    "io.before_rename": "a file's temporary copy is fully written, not yet renamed into place (target: final path)",
    "io.before_sidecar": "a tensor file is in place, its sha256 sidecar not yet written (target: tensor file)",
    "io.folder_before_rename": "a folder's temporary copy is complete, not yet renamed into place (target: folder)",
    "stage.before_build": "a stage holds its output's lock and starts building it (target: output folder)",
    "stage.before_manifest": "a stage's files are all written, its manifest not yet (target: output folder)",
    "stage.after_manifest": "a stage's manifest is written, Prefect has not yet recorded the result (target: folder)",
    "stage.reuse": "a stage found its output complete and is about to reuse it (target: output folder)",
    "lora.step": "after each LoRA optimizer step (target: trajectory folder)",
    "cvae.epoch": "after each CVAE training epoch (no target)",
    "pdiff.step": "after each COND P-DIFF autoencoder epoch and each denoiser step (no target)",
    "evaluate.batch": "after each evaluation batch (no target)",
}
"""Every fault point, with where it sits."""

_hits: dict[tuple[str, str], int] = {}
_hits_lock = threading.Lock()


def fault_point(name: str, target: str | Path | None = None, temp: str | Path | None = None) -> None:
    """Crash here if ``ICM_FAULT_KILL_AT`` asks for it (see the module docstring); a no-op otherwise.

    Args:
        name: One of :data:`POINTS`.
        target: The file or folder being produced here, matched against the spec's glob.
        temp: The temporary file being written, truncated first when the spec ends in ``~torn``.
    """
    spec = os.environ.get(KILL_ENV)
    trace = os.environ.get(TRACE_ENV)
    if not spec and not trace:
        return
    where = Path(target).as_posix() if target is not None else ""
    if trace:
        _append(trace, f"{time.time():.6f} {os.getpid()} {name} {where}\n")
    if not spec:
        return
    point, pattern, nth, torn = parse_spec(spec)
    if point != name or (pattern and not fnmatch.fnmatchcase(where, pattern)):
        return
    with _hits_lock:
        count = _hits[(point, spec)] = _hits.get((point, spec), 0) + 1
    if count != nth:
        return
    if torn and temp is not None and Path(temp).is_file():
        size = Path(temp).stat().st_size
        os.truncate(temp, size // 2)
    marker = os.environ.get(MARKER_ENV)
    if marker:
        _append(marker, f"{name} {where}\n")
    os.kill(os.getpid(), signal.SIGKILL)


def parse_spec(spec: str) -> tuple[str, str, int, bool]:
    """``"io.before_rename@*/x.json#2~torn"`` -> ``("io.before_rename", "*/x.json", 2, True)``."""
    torn = spec.endswith("~torn")
    rest = spec.removesuffix("~torn")
    nth = 1
    if "#" in rest:
        rest, count = rest.rsplit("#", 1)
        nth = int(count)
    point, _, pattern = rest.partition("@")
    if point not in POINTS:
        raise ValueError(f"{KILL_ENV}: unknown fault point {point!r}; known: {sorted(POINTS)}")
    if nth < 1:
        raise ValueError(f"{KILL_ENV}: hit count must be >= 1, got {nth}")
    return point, pattern, nth, torn


def _append(path: str, line: str) -> None:
    # O_APPEND: lines from concurrent processes never interleave (one short write each).
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
