"""How long a new category's zero-shot adapter takes on the real model: the part of the registry's "within a
minute of the event" that scales with the model (the Prefect trigger and worker pick-up come on top).

    .venv/bin/python scripts/bench_zero_shot.py [--text README.md] [--samples 16] [--generator FILE] [--repeat 3]

Times, in this process: reading the text; loading the base model (the built-in SmolLM2-135M by default) and its
tokenizer; Eq. 1 on the base model over k samples of ``--sample-tokens`` tokens (``icm_core.zeroshot.from_text``); and,
with ``--generator`` (one trained with ``task_vector.hidden_from=base``), decoding and writing the adapter. Prints
one JSON object. Nothing is cached between repeats except the model files on disk.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", default=str(REPO / "README.md"), help="the new category's text (file or folder)")
    parser.add_argument("--model", default="smollm2-135m", help="base model (ModelConfig.name_or_path)")
    parser.add_argument("--samples", type=int, default=16, help="k (TaskVectorConfig default: 16)")
    parser.add_argument("--sample-tokens", type=int, default=128, help="tokens per sample (default: 128)")
    parser.add_argument("--generator", help="a generator trained on base-model vectors of --model (optional)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    import torch

    from icm_core.generator.config import SampleConfig, TaskVectorConfig
    from icm_core.generator.task_vectors import text_hidden_state_vector
    from icm_core.models.base_model import load_base_model, load_tokenizer
    from icm_core.models.config import ModelConfig
    from icm_core.zeroshot.from_text import TextVectorPlan, plan_text_vector, read_text_source, text_adapter

    model_cfg = ModelConfig(name_or_path=args.model, device="cpu")
    tv = TaskVectorConfig(hidden_from="base", num_samples=args.samples, sample_tokens=args.sample_tokens)
    rows = []
    for _ in range(args.repeat):
        row = {}
        t = time.perf_counter()
        texts = read_text_source(args.text)
        row["read_text_s"] = time.perf_counter() - t
        t = time.perf_counter()
        tokenizer, model = load_tokenizer(model_cfg), load_base_model(model_cfg)
        row["load_model_s"] = time.perf_counter() - t
        t = time.perf_counter()
        vector = text_hidden_state_vector(model, tokenizer, texts, tv.num_samples, tv.sample_tokens, tv.seed)
        row["eq1_s"] = time.perf_counter() - t
        if args.generator:
            plan: TextVectorPlan = plan_text_vector(args.generator, model_cfg, args.samples, args.sample_tokens)
            with tempfile.TemporaryDirectory() as tmp:
                t = time.perf_counter()
                text_adapter(
                    args.generator,
                    Path(tmp) / "adapter",
                    SampleConfig(),
                    text_path=args.text,
                    model_cfg=plan.model_cfg,
                    num_samples=args.samples,
                    sample_tokens=args.sample_tokens,
                )
                row["text_adapter_total_s"] = time.perf_counter() - t
        rows.append(row)
        del model
    summary = {
        "model": args.model,
        "k": args.samples,
        "sample_tokens": args.sample_tokens,
        "text": args.text,
        "threads": torch.get_num_threads(),
        "vector_dim": int(vector.shape[0]),
        "runs": rows,
        "median": {key: statistics.median(r[key] for r in rows) for key in rows[0]},
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
