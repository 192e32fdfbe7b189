"""Start-up time of the ``icm-lora`` command line: ``--help``, ``--version`` and a subcommand's ``--help``.

Each command runs as a fresh process ``--repeats`` times; the script prints the median and the best wall
time, and which heavy modules (torch, transformers, peft, prefect) the process imported (checked in a
separate run through the same entry point). For scale it also times ``python -c "import torch"``.

With ``--pipeline "ARGS"`` it also times ``icm-lora pipeline ARGS``, which must be answered from its run record
(a warm ``make demo``: run the same command once first so that the record exists; the script refuses to time a run
that is not "up to date").

    python scripts/bench_cli.py [--repeats 5] [--pipeline "--root artifacts"]
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


HEAVY = ("torch", "transformers", "peft", "prefect")
COMMANDS = (["--help"], ["--version"], ["pipeline", "--help"], ["generate", "--help"], ["registry", "scan", "--help"])


def timed(argv: list[str], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return times


def heavy_imports(args: list[str]) -> list[str]:
    code = (
        "import sys; from flows.cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        f"print('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True).stdout
    line = next(line for line in reversed(out.splitlines()) if line.startswith("HEAVY="))
    return [m for m in line.removeprefix("HEAVY=").split(",") if m]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pipeline", help="also time `icm-lora pipeline` with these arguments (a warm run)")
    args = parser.parse_args()
    exe = shutil.which("icm-lora") or str(Path(sys.executable).parent / "icm-lora")
    commands = list(COMMANDS)
    if args.pipeline is not None:
        warm = ["pipeline", *shlex.split(args.pipeline)]
        out = subprocess.run([exe, *warm], check=True, capture_output=True, text=True).stdout
        if "up to date" not in out:
            sys.exit("icm-lora pipeline " + args.pipeline + ": not answered from a run record; run it once first")
        commands.append(warm)
    print(f"{'command':<32} {'median s':>9} {'best s':>8}  heavy modules imported")
    for command in commands:
        times = timed([exe, *command], args.repeats)
        heavy = ", ".join(heavy_imports(command)) or "none"
        label = "icm-lora " + " ".join(command)
        print(f"{label:<32} {statistics.median(times):>9.3f} {min(times):>8.3f}  {heavy}")
    times = timed([sys.executable, "-c", "import torch"], args.repeats)
    label = '(python -c "import torch")'
    print(f"{label:<32} {statistics.median(times):>9.3f} {min(times):>8.3f}")


if __name__ == "__main__":
    main()
