"""Two real ``icm-lora pipeline`` processes started at once on one artifacts root: every stage output
(each category's fine-tune in particular) is built exactly once, both runs complete with the same results,
and every artifact verifies."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import yaml

from icm_core.infra.faults import TRACE_ENV
from tasks.manifest import valid_output
from tests.flows.crash import check_visible_files, hidden_leftovers, output_folders
from tests.flows.support import CATEGORIES, EVALUATED, expected_output_folders, states_by_name
from tests.flows.test_faults import eval_scores


REPO = Path(__file__).resolve().parents[2]
LORA_STEPS = 150  # ~1-2 s of training per category: long enough for the two runs to meet inside the LoRA stage


def read_trace(path: Path) -> list[tuple[float, int, str, str]]:
    rows = []
    for line in path.read_text().splitlines():
        stamp, pid, point, *target = line.split(" ", 3)
        rows.append((float(stamp), int(pid), point, target[0] if target else ""))
    return rows


def results_table(output: str) -> list[str]:
    """The results table the pipeline CLI prints (header, rule and one line per category)."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("category") and "PPL base" in line)
    return lines[start : start + 2 + len(CATEGORIES)]


def test_two_pipelines_at_once_build_every_output_once(workspace, prefect_api, tmp_path):
    config = workspace.config.model_copy(
        update={"lora": workspace.config.lora.model_copy(update={"steps": LORA_STEPS})}
    )
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json")), encoding="utf-8")
    trace = tmp_path / "trace.txt"
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_api,
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(workspace.results),
        "PREFECT_LOGGING_LEVEL": "WARNING",
        TRACE_ENV: str(trace),
    }
    command = [sys.executable, "-m", "flows.cli", "pipeline", "--root", str(workspace.root)]
    command += ["--config", str(config_file)]
    command += ["--categories", str(workspace.categories_file)]

    started = time.perf_counter()
    logs = [tmp_path / f"run-{i}.log" for i in range(2)]
    handles = [log.open("wb") for log in logs]
    processes = [
        subprocess.Popen(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT) for handle in handles
    ]
    try:
        codes = [process.wait(timeout=400) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        for handle in handles:
            handle.close()
    seconds = time.perf_counter() - started
    outputs = [log.read_text(errors="replace") for log in logs]
    assert codes == [0, 0], "\n\n".join(out[-3000:] for out in outputs)

    # 1) Every output folder was built by exactly one process, and nothing was trained twice.
    rows = read_trace(trace)
    builds = Counter(target for _, _, point, target in rows if point == "stage.before_build")
    folders = output_folders(workspace.root)
    assert {Path(t) for t in builds} == set(folders)
    assert set(builds.values()) == {1}, builds
    assert len(folders) == expected_output_folders()
    lora_steps = Counter(target for _, _, point, target in rows if point == "lora.step")
    assert sorted(lora_steps.values()) == [LORA_STEPS] * len(CATEGORIES), lora_steps
    assert len({pid for _, pid, _, _ in rows}) == 2, "one of the runs did no work at all"

    # 2) The runs overlapped: the second did its first stage work before the first run did its last.
    spans: dict[int, list[float]] = defaultdict(list)
    for stamp, pid, _, _ in rows:
        spans[pid].append(stamp)
    (first, second) = sorted(spans.values(), key=min)
    assert min(second) < max(first), "the second run started its first stage after the first run had finished"

    # 3) Both completed with the same results; every artifact verifies; no temporary file is left.
    assert results_table(outputs[0]) == results_table(outputs[1])
    assert all(valid_output(folder) is not None for folder in folders)
    assert check_visible_files(workspace.root)["manifests"] == expected_output_folders()
    assert hidden_leftovers(workspace.root) == []
    assert set(eval_scores(workspace.root)) == {(c, m) for c in CATEGORIES for m in EVALUATED}

    # 4) Prefect's records were not corrupted by the two writers: a third run is all cache hits.
    third = workspace.run(config=config)
    assert third.is_completed(), third.message
    assert set(states_by_name(third).values()) == {"Cached"}

    builders = Counter(pid for _, pid, point, _ in rows if point == "stage.before_build")
    reuses = Counter(pid for _, pid, point, _ in rows if point == "stage.reuse")
    print(
        f"two concurrent runs: {seconds:.1f} s wall; outputs built per process {dict(builders)}, "
        f"reused after waiting per process {dict(reuses)}; LoRA steps per category {sorted(lora_steps.values())}"
    )
