"""Run every core stage on a CUDA device with a tiny randomly initialised Llama (no downloads).

Checks that fine-tuning, task vectors, CVAE training, sampling and evaluation keep their tensors on
the configured device, and that the result matches the CPU run closely. Needs a GPU:

    python scripts/gpu_check.py [--device cuda]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from icm_core.config import load_run_config  # noqa: E402
from icm_core.data.categories import Category  # noqa: E402
from icm_core.in_process import run_in_process  # noqa: E402
from icm_core.report.console import format_table  # noqa: E402
from tests.helpers import save_tiny_base  # noqa: E402


TEXTS = {
    "recipes": "Whisk the eggs with sugar until pale, fold in the flour and bake for twenty minutes. ",
    "forecast": "Viking, North Utsire: southwesterly five to seven, occasionally gale eight later. Rain. ",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA device here")
    work = Path(tempfile.mkdtemp(prefix="icm-gpu-"))
    base = save_tiny_base(work / "tiny-base")
    categories = []
    for name, sentence in TEXTS.items():
        path = work / f"{name}.txt"
        path.write_text("\n\n".join(f"Note {i}. " + sentence * 4 for i in range(40)))
        categories.append(Category(name=name, description=f"{name} text", source=str(path)))
    results = {}
    for device in ("cpu", args.device):
        cfg = load_run_config(
            None,
            [
                f"model.name_or_path={base}",
                f"model.device={device}",
                "data.min_chars=500",
                "data.seq_len=64",
                "lora.steps=30",
                "lora.trajectory_size=5",
                "lora.last_n_layers=null",
                "task_vector.num_samples=4",
                "task_vector.sample_tokens=32",
                "cvae.epochs=60",
                "eval.max_tokens=1024",
            ],
        )
        started = time.perf_counter()
        result = run_in_process(categories, cfg, work / device, log=lambda m: None)
        print(f"== {device}: {time.perf_counter() - started:.1f} s")
        print(format_table(result["rows"]))
        results[device] = result["rows"]
    for cpu_row, dev_row in zip(results["cpu"], results[args.device], strict=True):
        rel = abs(cpu_row["ppl_lora"] - dev_row["ppl_lora"]) / cpu_row["ppl_lora"]
        print(
            f"{cpu_row['category']}: LoRA PPL cpu {cpu_row['ppl_lora']:.4f} vs {args.device} "
            f"{dev_row['ppl_lora']:.4f} (rel diff {rel:.2e})"
        )


if __name__ == "__main__":
    main()
