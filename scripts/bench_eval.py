"""Evaluation benchmarks: seconds per evaluation task before/after the shared base model, and how the 95% interval
of the ICM-LoRA vs LoRA difference narrows with the number of scored blocks (measured on the validation split,
so the test split's budget is not chosen by looking at test results).

    python scripts/bench_eval.py timing  [--root artifacts] [--adapters 4]
    python scripts/bench_eval.py budget  [--root artifacts] [--categories news,python-docs] [--max-blocks 64]

``timing`` scores the same adapters twice on one category's test blocks at the default budget: once the way
every evaluation task worked before (load tokenizer and base model, peft merge_and_unload, score; per task) and
once the way it works now (one shared base model per process; the adapter's deltas added in place and the
weights restored afterwards). ``budget`` scores each category's original LoRA and ICM-LoRA adapter (from a
finished pipeline run under ``--root``) on up to ``--max-blocks`` validation blocks and prints the paired
bootstrap interval of the relative PPL difference for 8, 16, 32, ... of those blocks (evenly spaced).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from icm_core.config import RunConfig
from icm_core.data.splits import read_splits
from icm_core.evaluation.perplexity import eval_blocks, evaluate_lm, score_blocks, spread_indices
from icm_core.evaluation.stats import paired_bootstrap, relative_difference
from icm_core.lora.adapters import merge_adapter, merged_into
from icm_core.lora.trajectory import read_trajectory
from icm_core.models.base_model import load_base_model, load_tokenizer, shared_base_model


def latest(root: Path, stage: str, category: str, name: str) -> Path:
    """The newest complete output folder (manifest present) of a stage for a category."""
    folders = sorted(
        (p.parent for p in (root / stage / category).glob("*/manifest.json")), key=lambda p: p.stat().st_mtime
    )
    if not folders:
        raise SystemExit(f"no complete {stage} output for {category} under {root}; run the pipeline first")
    return folders[-1] / name


def finished(root: Path, stage: str) -> list[str]:
    """Categories with at least one complete output of ``stage``."""
    return sorted(p.name for p in (root / stage).iterdir() if any(p.glob("*/manifest.json")))


def lora_adapter(root: Path, category: str) -> Path:
    return read_trajectory(latest(root, "lora", category, "")).adapter_dir


def timing(args: argparse.Namespace) -> None:
    cfg = RunConfig()
    root = Path(args.root)
    categories = finished(root, "lora")[: args.adapters]
    adapters = [lora_adapter(root, c) for c in categories]
    splits = latest(root, "data", categories[0], "splits")
    texts = read_splits(splits).test
    for budget in sorted({2048, cfg.eval.max_tokens}):
        eval_cfg = cfg.eval.model_copy(update={"max_tokens": budget})
        before, after, ppl_before, ppl_after = [], [], [], []
        for adapter in adapters:  # the previous evaluation task: everything loaded per task
            started = time.perf_counter()
            tokenizer = load_tokenizer(cfg.model)
            model = merge_adapter(load_base_model(cfg.model), adapter, cfg.model.name_or_path)
            ppl_before.append(evaluate_lm(model, tokenizer, texts, cfg.data.seq_len, eval_cfg).ppl)
            before.append(time.perf_counter() - started)
            del model
        for adapter in adapters:  # now: one base model per process, adapters merged in place and restored
            started = time.perf_counter()
            tokenizer = load_tokenizer(cfg.model)
            with shared_base_model(cfg.model) as base, merged_into(base, adapter, cfg.model.name_or_path) as model:
                ppl_after.append(evaluate_lm(model, tokenizer, texts, cfg.data.seq_len, eval_cfg).ppl)
            after.append(time.perf_counter() - started)
        same = max(abs(a - b) / b for a, b in zip(ppl_after, ppl_before, strict=True))
        print(
            f"budget {budget} tokens, {len(adapters)} adapters on {categories[0]}: "
            f"before {sum(before) / len(before):.1f} s/task (first {before[0]:.1f}), "
            f"after {sum(after) / len(after):.1f} s/task (first {after[0]:.1f}, incl. the one base-model load); "
            f"largest relative PPL difference between the two paths {same:.2e}"
        )


def budget(args: argparse.Namespace) -> None:
    cfg = RunConfig()
    root = Path(args.root)
    tokenizer = load_tokenizer(cfg.model)
    categories = args.categories.split(",") if args.categories else finished(root, "adapters")
    for category in categories:
        texts = read_splits(latest(root, "data", category, "splits")).val
        blocks = eval_blocks(texts, tokenizer, cfg.data.seq_len, args.max_blocks * cfg.data.seq_len)
        scores = {}
        for name, adapter in (
            ("lora", lora_adapter(root, category)),
            ("icm_lora", latest(root, "adapters", category, "adapter")),
        ):
            with shared_base_model(cfg.model) as base, merged_into(base, adapter, cfg.model.name_or_path) as model:
                scores[name] = score_blocks(model, blocks, cfg.eval.batch_size)
        n_all = len(scores["lora"].block_nll)
        sizes = [n for n in (8, 16, 32, 64, 128) if n < n_all] + [n_all]
        for n in sizes:
            keep = spread_indices(n_all, n)
            a = [scores["icm_lora"].block_nll[i] for i in keep]
            b = [scores["lora"].block_nll[i] for i in keep]
            t = [scores["lora"].block_tokens[i] for i in keep]
            low, high = paired_bootstrap(a, b, t)
            print(
                f"{category:<12} val blocks {n:>3} ({n * cfg.data.seq_len:>5} tokens): ICM-LoRA vs LoRA "
                f"{relative_difference(a, b, t):+.3%} [{low:+.3%}, {high:+.3%}] width {high - low:.3%}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("timing")
    t.add_argument("--root", default="artifacts")
    t.add_argument("--adapters", type=int, default=4)
    b = sub.add_parser("budget")
    b.add_argument("--root", default="artifacts")
    b.add_argument("--categories")
    b.add_argument("--max-blocks", type=int, default=64)
    args = parser.parse_args()
    timing(args) if args.command == "timing" else budget(args)


if __name__ == "__main__":
    main()
