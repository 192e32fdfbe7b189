"""How much a warm pipeline run reads: bytes hashed (sha256) and wall time when every task is a cache hit.

A demo-shaped run: the real SmolLM2-135M (built-in alias), the five built-in categories, the demo's output
shapes (LoRA rank / layers / trajectory of 10 checkpoints, the official 12-layer CVAE, COND P-DIFF, every
method), with the compute cut down (10 LoRA steps, 2 CVAE epochs, few eval tokens) so the cold run that
fills the root takes minutes, not the demo's 19. Then the same run again, ``--warm`` times: every task is a
cache hit, and what it hashes is what the cache bookkeeping costs.

    .venv/bin/python scripts/bench_warm.py [--root /tmp/icm-bench-warm] [--warm 2] [--verify] [--only news,wikipedia]

Counting: every call of ``icm_core.infra.io`` (the only hashing function the project uses on files) is
wrapped, in every loaded module, and its file sizes are summed. The script runs the same way against older
commits (the issue-14 "before" numbers come from 029683b: ``PYTHONPATH=<checkout> python scripts/bench_warm.py``
from that checkout), since it only uses the pipeline flow and ``icm_core.infra.io``. ``--tiny`` needs the repository
root on ``PYTHONPATH`` (it imports ``tests.helpers``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


DEMO_LIKE = [
    "lora.steps=10",
    "lora.warmup_steps=1",
    "cvae.epochs=2",
    "pdiff.ae_epochs=2",
    "pdiff.ddpm_steps=20",
    "pdiff.log_every=10",
    "task_vector.num_samples=2",
    "eval.max_tokens=64",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--root", default=None, help="artifacts root (default: a temp folder; reuse one to skip the cold run)"
    )
    parser.add_argument("--models", default=None, help="ModelConfig.cache_dir for the converted SmolLM2 (shared)")
    parser.add_argument("--warm", type=int, default=2, help="warm runs to time (default 2)")
    parser.add_argument("--only", default=None, help="comma-separated demo categories (default: all five)")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="the flow tests' tiny Llama and two small categories instead of SmolLM2 and the demo categories "
        "(same stages and methods; for a loaded machine)",
    )
    parser.add_argument("--verify", action="store_true", help="warm runs with full verification (ICM_VERIFY=full)")
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()

    root = Path(args.root or tempfile.mkdtemp(prefix="icm-bench-warm-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    models = Path(args.models or root.parent / "icm-bench-models").resolve()
    os.environ.setdefault("PREFECT_HOME", str(root.parent / f"{root.name}-prefect-home"))
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    # Older commits keep the records where this setting says; current ones put them inside the root anyway.
    os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(root / ".prefect" / "results")
    for key, value in {
        "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }.items():
        os.environ.setdefault(key, value)

    import icm_core.infra.io
    from flows.pipeline import icm_pipeline
    from icm_core.config import load_run_config

    counter = {"files": 0, "bytes": 0}
    original = icm_core.infra.io

    def counting_sha256(path, *a, **k):
        counter["files"] += 1
        counter["bytes"] += os.path.getsize(path)
        return original(path, *a, **k)

    for module in list(sys.modules.values()):
        for name, value in list(vars(module).items()) if hasattr(module, "__dict__") else []:
            if value is original:
                setattr(module, name, counting_sha256)

    categories_file = None
    if args.tiny:
        from tests import helpers
        from tests.flows.support import forecast_text, recipe_text, tiny_run_config, write_categories

        model_dir = root.parent / f"{root.name}-tiny-model"
        if not (model_dir / "config.json").is_file():
            helpers.save_tiny_base(model_dir)
        texts = {"recipes": recipe_text(), "forecast": forecast_text()}
        categories_file = str(write_categories(root.parent / f"{root.name}-categories", texts))
        cfg = tiny_run_config(model_dir)
    else:
        cfg = load_run_config(None, [*DEMO_LIKE, f"model.cache_dir={models}"])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()

    def run(label: str, verify: bool = False) -> dict:
        counter.update(files=0, bytes=0)
        kwargs = {"verify": True} if verify else {}
        started = time.perf_counter()
        if args.only:
            kwargs["only"] = [name.strip() for name in args.only.split(",")]
        if categories_file:
            kwargs["categories_file"] = categories_file
        state = icm_pipeline(config=cfg, root=str(root), publish=False, return_state=True, **kwargs)
        seconds = time.perf_counter() - started
        if not state.is_completed():
            sys.exit(f"{label} run failed: {state.message}")
        row = {
            "run": label,
            "seconds": round(seconds, 2),
            "files_hashed": counter["files"],
            "bytes_hashed": counter["bytes"],
        }
        print(
            f"{label:>6}: {seconds:7.1f} s, {counter['files']:5d} files hashed, "
            f"{counter['bytes'] / 1e6:9.2f} MB hashed",
            flush=True,
        )
        return row

    rows = [run("fill")]
    for i in range(args.warm):
        rows.append(run(f"warm{i + 1}", verify=args.verify))
    warm = rows[1:]
    outputs = sum(1 for _ in root.glob("*/**/manifest.json"))
    output_bytes = sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and ".prefect" not in p.parts)
    summary = {
        "commit": commit,
        "root": str(root),
        "outputs": outputs,
        "output_bytes": output_bytes,
        "warm_median_s": statistics.median(r["seconds"] for r in warm) if warm else None,
        "warm_bytes_hashed": [r["bytes_hashed"] for r in warm],
        "runs": rows,
        "verify": args.verify,
    }
    print(
        f"commit {commit}: {outputs} outputs ({output_bytes / 1e6:.1f} MB on disk); warm run: median "
        f"{summary['warm_median_s']:.1f} s, bytes hashed {summary['warm_bytes_hashed']}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
