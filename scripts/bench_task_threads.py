"""Benchmark: a flow that submits many torch tasks at once, on Prefect's default thread pool (a thread per
submitted task) against this package's bounded pool (``flows.runtime.thread_task_runner``).

Each task is one forward pass of the real base model (SmolLM2-135M by default) on a batch of token blocks,
under the same shared-model lock as an evaluation (``icm_core.models.base_model``): what the
leave-out flow's evaluations do, minus the data. Each runner runs in its own process, which prints its wall
time, peak RSS and peak OS thread count:

    .venv/bin/python scripts/bench_task_threads.py [--tasks 48] [--batch 8] [--tokens 128]

Everything runs against a temporary local Prefect server (or PREFECT_API_URL).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import threading
import time


RUNNERS = ("prefect-default", "bounded")


def os_threads() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("Threads:"))


def child(runner_name: str, tasks: int, batch: int, tokens: int) -> dict:
    import torch
    from prefect import flow, task
    from prefect.cache_policies import NONE
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.runtime import thread_task_runner
    from icm_core.models.base_model import shared_base_model
    from icm_core.models.config import ModelConfig

    cfg = ModelConfig()
    ids = torch.randint(0, 1000, (batch, tokens), generator=torch.Generator().manual_seed(0))

    @task(cache_policy=NONE, persist_result=False)
    def forward(i: int) -> float:
        with shared_base_model(cfg) as model, torch.no_grad():
            return float(model(ids).logits[0, -1, 0])

    runner = ThreadPoolTaskRunner() if runner_name == "prefect-default" else thread_task_runner()

    @flow(task_runner=runner)
    def many_forwards(n: int) -> list[float]:
        return [f.result() for f in forward.map(range(n))]

    with shared_base_model(cfg) as model, torch.no_grad():
        model(ids)  # load and warm the model before timing
    peak = {"threads": os_threads()}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.2):
            peak["threads"] = max(peak["threads"], os_threads())

    threading.Thread(target=sample, daemon=True).start()
    started = time.perf_counter()
    outputs = many_forwards(tasks)
    seconds = time.perf_counter() - started
    done.set()
    assert len(outputs) == tasks and len(set(outputs)) == 1, "every task must compute the same forward pass"
    return {
        "runner": runner_name,
        "pool_size": runner._max_workers,
        "tasks": tasks,
        "seconds": round(seconds, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "peak_os_threads": peak["threads"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=48)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--child", choices=RUNNERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.tasks, args.batch, args.tokens)), flush=True)
        return
    rows = []
    for name in RUNNERS:
        command = [sys.executable, __file__, "--child", name, "--tasks", str(args.tasks),
                   "--batch", str(args.batch), "--tokens", str(args.tokens)]  # fmt: skip
        out = subprocess.run(command, capture_output=True, text=True, check=False)
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode != 0 or not lines:
            sys.exit(f"{name}: the benchmark process failed ({out.returncode}):\n{out.stderr[-3000:]}")
        rows.append(json.loads(lines[-1].removeprefix("RESULT ")))
        print(json.dumps(rows[-1]), flush=True)
    print()
    print(f"{args.tasks} tasks, each a forward pass of {args.batch} x {args.tokens} tokens")
    print("| runner | pool size | wall s | peak RSS MB | peak OS threads |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        size = "unbounded" if row["pool_size"] >= 2**31 else row["pool_size"]
        print(f"| {row['runner']} | {size} | {row['seconds']} | {row['peak_rss_mb']} | {row['peak_os_threads']} |")


if __name__ == "__main__":
    main()
