"""Benchmark of the Prefect pipeline as a new user meets it.

1. cold ``make demo`` in a fresh clone of this repository (install + model conversion + full pipeline);
2. warm ``make demo`` again in that clone (every task a cache hit);
3. orchestration overhead: the pipeline on a fresh artifacts root (venv and converted model already there)
   vs. the same stages called directly in one process (``scripts/bench_core.py``, whose extra latency
   measurement adds a few seconds to the direct side) on another fresh root.

    .venv/bin/python scripts/bench_pipeline.py [--repo .] [--workdir /tmp/icm-bench] [--skip-cold]

Prints each wall time; the targets are cold <= 20 min, warm <= 60 s, overhead <= 10 %.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(cmd: list[str], cwd: Path, log: Path, env: dict[str, str] | None = None) -> float:
    print(f"$ {' '.join(cmd)}  (in {cwd}, log {log})", flush=True)
    started = time.perf_counter()
    with open(log, "w") as handle:
        proc = subprocess.run(cmd, cwd=cwd, stdout=handle, stderr=subprocess.STDOUT, env=env)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}); see {log}")
    print(f"  {seconds:.1f} s", flush=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", default=".", help="repository to clone (its committed HEAD)")
    parser.add_argument("--workdir", default=None, help="where to clone (default: a temp folder)")
    parser.add_argument("--skip-cold", action="store_true", help="reuse an existing clone in --workdir")
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="icm-bench-"))
    clone = work / "icm-lora"
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    results: dict[str, float] = {}
    if not args.skip_cold:
        shutil.rmtree(clone, ignore_errors=True)
        subprocess.run(["git", "clone", "-q", str(Path(args.repo).resolve()), str(clone)], check=True)
        results["cold_make_demo_s"] = timed(["make", "demo"], clone, logs / "cold.log")
    results["warm_make_demo_s"] = timed(["make", "demo"], clone, logs / "warm.log")
    env = {**os.environ, "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    py = str(clone / ".venv" / "bin" / "python")
    for root in ("bench-pipeline", "bench-direct"):
        shutil.rmtree(clone / "artifacts" / root, ignore_errors=True)
    env["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(clone / "artifacts" / "bench-pipeline" / ".prefect" / "results")
    results["pipeline_fresh_root_s"] = timed(
        [py, "-m", "flows.pipeline", "--root", "artifacts/bench-pipeline"], clone, logs / "pipeline.log", env
    )
    # The direct run is scripts/bench_core.py: the same stages in one process, which also prints the
    # library's own numbers (gain recovered, generation latency, generator size).
    results["direct_fresh_root_s"] = timed(
        [py, "scripts/bench_core.py", "--out", "artifacts/bench-direct", "--json", str(work / "core.json")],
        clone,
        logs / "direct.log",
        env,
    )
    overhead = results["pipeline_fresh_root_s"] / results["direct_fresh_root_s"] - 1
    results["orchestration_overhead"] = overhead
    print()
    if "cold_make_demo_s" in results:
        print(f"cold make demo:        {results['cold_make_demo_s'] / 60:.1f} min (target <= 20 min)")
    print(f"warm make demo:        {results['warm_make_demo_s']:.1f} s (target <= 60 s)")
    print(
        f"pipeline vs direct:    {results['pipeline_fresh_root_s']:.1f} s vs {results['direct_fresh_root_s']:.1f} s, "
        f"overhead {overhead:+.1%} (target <= 10%)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
