"""Benchmark of the core library (no Prefect) on the demo categories.

Runs every stage in one process (``icm_core.in_process``) and prints, per category, PPL and BPC
of the base model, the original LoRA and the generated (ICM-LoRA) adapter, and the share of the
fine-tuning gain the generated adapter recovers, (PPL_base - PPL_gen) / (PPL_base - PPL_lora).
Then it times generating one adapter (median over repeats: z ~ N(0, I), decode, de-normalise,
unflatten; writing the folder timed separately) and compares the generator's size with the
checkpoint store it was trained on.

    .venv/bin/python scripts/bench_core.py [--config run.yaml] [--set section.field=value ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from icm_core.config import load_run_config
from icm_core.data.categories import builtin_categories, load_category_file
from icm_core.generator.config import SampleConfig
from icm_core.generator.generator import load_generator
from icm_core.in_process import run_in_process
from icm_core.lora.adapters import write_adapter
from icm_core.report.console import format_table


def checkpoint_store_bytes(root: Path) -> tuple[int, int]:
    files = list((root / "lora").rglob("checkpoint-*.safetensors"))
    return sum(f.stat().st_size for f in files), len(files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--categories")
    parser.add_argument("--only")
    parser.add_argument("--out", default=None, help="artifacts root (default: a fresh temp folder)")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--json", help="write all numbers here")
    args = parser.parse_args()
    cfg = load_run_config(args.config, args.set)
    categories = load_category_file(args.categories) if args.categories else builtin_categories()
    if args.only:
        keep = set(args.only.split(","))
        categories = [c for c in categories if c.name in keep]
    root = Path(args.out or tempfile.mkdtemp(prefix="icm-bench-"))
    torch.set_num_threads(torch.get_num_threads())

    started = time.perf_counter()
    result = run_in_process(categories, cfg, root, log=lambda m: print(m, flush=True))
    total = time.perf_counter() - started
    print()
    print(format_table(result["rows"]))
    gains = [r["gain_recovered"] for r in result["rows"] if r["gain_recovered"] is not None]
    print(f"\nmin gain recovered: {min(gains):.1%}  (target >= 95% on every category)")

    generator_path = Path(result["generator"]["path"])
    generator = load_generator(generator_path)
    name = result["rows"][0]["category"]
    generator.generate_for(name, SampleConfig(seed=0))  # warm-up
    times = []
    for seed in range(args.repeats):
        t0 = time.perf_counter()
        generator.generate_for(name, SampleConfig(seed=seed))
        times.append(time.perf_counter() - t0)
    state = generator.generate_for(name, SampleConfig(seed=0))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        write_adapter(Path(tmp) / "adapter", state, generator.adapter_config)
        write_ms = 1000 * (time.perf_counter() - t0)
    gen_ms = 1000 * statistics.median(times)
    print(
        f"generation latency (one adapter, {args.repeats} draws): median {gen_ms:.1f} ms, "
        f"min {1000 * min(times):.1f} ms, max {1000 * max(times):.1f} ms; writing the folder {write_ms:.1f} ms "
        "(target <= 100 ms)"
    )
    store_bytes, n_ckpt = checkpoint_store_bytes(root)
    gen_bytes = generator_path.stat().st_size
    n_params = sum(p.numel() for p in generator.model.parameters())
    print(
        f"generator: {gen_bytes / 1e6:.2f} MB ({n_params:,} CVAE parameters); checkpoint store: "
        f"{store_bytes / 1e6:.2f} MB in {n_ckpt} checkpoints; share {gen_bytes / store_bytes:.1%} (target <= 5%)"
    )
    print("stage timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in result["timings"].items()))
    print(f"total wall time: {total:.1f} s; artifacts under {root}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    **result,
                    "generate_ms_median": gen_ms,
                    "write_ms": write_ms,
                    "generator_bytes": gen_bytes,
                    "checkpoint_store_bytes": store_bytes,
                    "total_seconds": total,
                },
                indent=2,
                default=str,
            )
        )


if __name__ == "__main__":
    main()
