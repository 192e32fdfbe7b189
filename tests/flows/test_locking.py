"""Two runs building the same stage output at once: one builds, the other waits and reuses it."""

from __future__ import annotations

import multiprocessing
import threading
import time
from pathlib import Path

from tasks.stage import run_stage


def _slow_build(counter: Path):
    def build(out: Path) -> dict:
        with open(counter, "a") as handle:  # one line per build, from any thread or process
            handle.write("built\n")
        time.sleep(0.5)  # long enough that the other run arrives while this one is building
        (out / "weights.txt").write_text("complete")
        return {"n": 1}

    return build


def _run(root: str, counter: str, out: multiprocessing.Queue | None = None) -> str:
    ref = run_stage("lora", "news", {"root": root, "cfg": {"steps": 3}}, _slow_build(Path(counter)))
    if out is not None:
        out.put(ref.sha256)
    return ref.sha256


def test_concurrent_threads_build_once(tmp_path):
    counter = tmp_path / "builds.txt"
    results: list[str] = []
    threads = [
        threading.Thread(target=lambda: results.append(_run(str(tmp_path / "root"), str(counter)))) for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert counter.read_text().count("built") == 1
    assert len(results) == 3 and len(set(results)) == 1


def test_concurrent_processes_build_once(tmp_path):
    counter = tmp_path / "builds.txt"
    queue: multiprocessing.Queue = multiprocessing.get_context("spawn").Queue()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_run, args=(str(tmp_path / "root"), str(counter), queue)) for _ in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    hashes = {queue.get(timeout=5) for _ in procs}
    assert counter.read_text().count("built") == 1
    assert len(hashes) == 1
    (folder,) = [p for p in (tmp_path / "root" / "lora" / "news").iterdir() if p.is_dir()]
    assert (folder / "weights.txt").read_text() == "complete"
