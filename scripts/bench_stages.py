"""Per-stage wall time and efficiency against a bare reference measured in the same run.

Three stages of the demo, each on the real SmolLM2 model and a real demo category, each next to the
simplest code that does the same arithmetic (same threads, same shapes, same process):

1. CVAE training: GFLOP/s of ``train_cvae`` (the real loop: batches, loss, AdamW, clipping, schedule, BatchNorm
   recalibration) on weights of the demo's LoRA length, against a bare ``Conv1d`` of the generator's widest
   layer (forward + backward). FLOPs are counted by ``torch.utils.flop_counter`` on one step of each.
2. LoRA fine-tune: tokens/s of ``train_lora`` (peft wrapping, AdamW, clipping, schedule, trajectory checkpoints,
   final adapter) against a bare forward + backward of the same peft model on the same blocks.
3. Evaluation: tokens/s of ``evaluate_adapter`` (tokenise the test split, merge the adapter into the shared base
   model, score, restore) against a bare no-grad forward of the base model over the same blocks.

    .venv/bin/python scripts/bench_stages.py [--category wikipedia] [--cvae-steps 30] [--lora-steps 12]
        [--json out.json] [--set section.field=value ...]

The ratios, not the absolute times, are the figure to quote: both sides of each ratio run back to back.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from icm_core.config import RunConfig, load_run_config
from icm_core.data.categories import builtin_categories
from icm_core.data.splits import read_splits
from icm_core.data.stages import prepare_data
from icm_core.data.tokens import token_blocks
from icm_core.evaluation.perplexity import eval_blocks
from icm_core.evaluation.stages import evaluate_adapter
from icm_core.generator.cvae import ConditionalVAE, cvae_loss
from icm_core.generator.train import train_cvae
from icm_core.lora.adapters import lora_config_for, lora_state_dict
from icm_core.lora.train import train_lora
from icm_core.models.base_model import adapter_base_reference, load_base_model, load_tokenizer, shared_base_model


def timed(fn, repeats: int = 1) -> float:
    """Median wall seconds of ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def flops_of(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


# ------------------------------------------------------------------------------------------------ CVAE


def widest_layer(model: ConditionalVAE, x: torch.Tensor, c: torch.Tensor) -> tuple[nn.Module, torch.Size]:
    """The conv layer with the most multiply-adds in one forward, and its input shape."""
    seen: list[tuple[int, nn.Module, torch.Size]] = []

    def hook(module, inputs, output):
        cin, cout, k = module.in_channels, module.out_channels, module.kernel_size[0]
        seen.append((cin * cout * k * output.shape[-1] * output.shape[0], module, inputs[0].shape))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv1d | nn.ConvTranspose1d)]
    with torch.no_grad():
        model(x, c)
    for h in handles:
        h.remove()
    _, module, shape = max(seen, key=lambda item: item[0])
    return module, shape


def bench_cvae(cfg: RunConfig, length: int, cond_dim: int, steps: int) -> dict[str, Any]:
    batch = cfg.cvae.batch_size
    n = batch * 5 + 2  # a few batches per epoch, like the demo's 50 checkpoints over 8
    gen = torch.Generator().manual_seed(0)
    weights = torch.randn(n, length, generator=gen)
    conds = torch.randn(n, cond_dim, generator=gen)
    model = ConditionalVAE(length, cond_dim, cfg.cvae)
    model.train()
    x, c = weights[:batch], conds[:batch]

    def step() -> None:
        x_hat, mu, logvar = model(x, c)
        loss, _, _ = cvae_loss(x_hat, x, mu, logvar, cfg.cvae.kld_weight)
        loss.backward()

    step_flops = flops_of(step)
    steps_per_epoch = -(-n // batch)
    epochs = max(2, steps // steps_per_epoch)
    run_cfg = cfg.cvae.model_copy(update={"epochs": epochs, "val_every": 0})
    train_cvae(weights, conds, run_cfg.model_copy(update={"epochs": 1}))  # warm-up (allocator, oneDNN primitives)
    ends: list[float] = []
    started = time.perf_counter()
    train_cvae(weights, conds, run_cfg, on_epoch=lambda epoch, row: ends.append(time.perf_counter()))
    seconds = time.perf_counter() - started
    # The loop's rate between the first and the last epoch end: training steps only (model build, the first
    # epoch's set-up and the final BatchNorm recalibration are outside it).
    done = (epochs - 1) * steps_per_epoch
    loop_gflops = step_flops * done / (ends[-1] - ends[0]) / 1e9

    layer, shape = widest_layer(model, x, c)
    extra = {"output_padding": layer.output_padding[0]} if isinstance(layer, nn.ConvTranspose1d) else {}
    bare = type(layer)(
        layer.in_channels,
        layer.out_channels,
        layer.kernel_size[0],
        stride=layer.stride[0],
        padding=layer.padding[0],
        **extra,
    )
    name = f"{type(layer).__name__}({layer.in_channels}->{layer.out_channels}, k{layer.kernel_size[0]})"
    inp = torch.randn(shape, requires_grad=True)

    def bare_step() -> None:
        bare(inp).sum().backward()

    bare_flops = flops_of(bare_step)
    for _ in range(3):
        bare_step()
    reps = max(5, int(0.5 * 1e9 / max(bare_flops, 1)))  # ~a second of work per timing
    bare_seconds = timed(lambda: [bare_step() for _ in range(reps)], repeats=3) / reps
    bare_gflops = bare_flops / bare_seconds / 1e9
    return {
        "stage": "cvae",
        "wall_s": seconds,
        "steps": done,
        "step_gflop": step_flops / 1e9,
        "gflops": loop_gflops,
        "bare": f"{name} on {list(shape)}, forward + backward",
        "bare_gflops": bare_gflops,
        "ratio": loop_gflops / bare_gflops,
    }


# ------------------------------------------------------------------------------------------------ LoRA


def bench_lora(cfg: RunConfig, data_dir: Path, work: Path, steps: int) -> dict[str, Any]:
    from peft import get_peft_model

    tokenizer = load_tokenizer(cfg.model)
    blocks = token_blocks(read_splits(data_dir).train, tokenizer, cfg.data.seq_len)
    lora_cfg = cfg.lora.model_copy(update={"steps": steps, "warmup_steps": 1, "trajectory_size": min(10, steps)})
    tokens = steps * lora_cfg.batch_size * cfg.data.seq_len

    base = load_base_model(cfg.model)
    warm = lora_cfg.model_copy(update={"steps": 2, "trajectory_size": 1})
    train_lora(base, blocks, warm, work / "lora-warm", adapter_base_reference(cfg.model))
    base = load_base_model(cfg.model)
    started = time.perf_counter()
    train_lora(base, blocks, lora_cfg, work / "lora", adapter_base_reference(cfg.model))
    seconds = time.perf_counter() - started

    torch.manual_seed(lora_cfg.seed)
    bare_base = load_base_model(cfg.model)
    model = get_peft_model(bare_base, lora_config_for(bare_base, lora_cfg, "bench"))
    model.train()
    batches = [blocks[i % blocks.shape[0] : i % blocks.shape[0] + lora_cfg.batch_size] for i in range(steps)]
    batches = [b if b.shape[0] == lora_cfg.batch_size else blocks[: lora_cfg.batch_size] for b in batches]

    def bare() -> None:
        for b in batches:
            model(input_ids=b, labels=b).loss.backward()

    model(input_ids=batches[0], labels=batches[0]).loss.backward()  # warm-up
    bare_seconds = timed(bare)
    return {
        "stage": "lora",
        "wall_s": seconds,
        "steps": steps,
        "tokens_per_s": tokens / seconds,
        "bare": "peft model forward + backward, same blocks",
        "bare_tokens_per_s": tokens / bare_seconds,
        "ratio": bare_seconds / seconds,
    }


# ------------------------------------------------------------------------------------------ evaluation


def bench_eval(cfg: RunConfig, data_dir: Path, adapter_dir: Path) -> dict[str, Any]:
    tokenizer = load_tokenizer(cfg.model)
    blocks = eval_blocks(read_splits(data_dir).test, tokenizer, cfg.data.seq_len, cfg.eval.max_tokens)
    tokens = blocks.input_ids.numel()
    evaluate_adapter(data_dir, adapter_dir, cfg.model, cfg.data, cfg.eval)  # loads the shared base model once
    seconds = timed(lambda: evaluate_adapter(data_dir, adapter_dir, cfg.model, cfg.data, cfg.eval), repeats=3)

    with shared_base_model(cfg.model) as model:

        @torch.no_grad()
        def bare() -> None:
            for batch in blocks.input_ids.split(cfg.eval.batch_size):
                model(input_ids=batch)

        bare_seconds = timed(bare, repeats=3)
    return {
        "stage": "evaluate",
        "wall_s": seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "bare": "base model no-grad forward, same blocks",
        "bare_tokens_per_s": tokens / bare_seconds,
        "ratio": bare_seconds / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--category", default="wikipedia")
    parser.add_argument("--cvae-steps", type=int, default=30, help="CVAE optimizer steps timed")
    parser.add_argument("--lora-steps", type=int, default=12, help="LoRA optimizer steps timed")
    parser.add_argument("--only", help="comma-separated subset of cvae,lora,evaluate")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    cfg = load_run_config(args.config, args.set)
    only = set(args.only.split(",")) if args.only else {"cvae", "lora", "evaluate"}
    category = {c.name: c for c in builtin_categories()}[args.category]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; category {category.name}", flush=True)

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="icm-bench-stages-") as tmp:
        work = Path(tmp)
        prepare_data(category, cfg.data, work / "data")
        if "lora" in only:
            rows.append(bench_lora(cfg, work / "data", work, args.lora_steps))
        if "cvae" in only:
            # The demo's flattened LoRA length: read it off a real adapter of the configured LoRA.
            from peft import get_peft_model

            base = load_base_model(cfg.model)
            peft_model = get_peft_model(base, lora_config_for(base, cfg.lora, "bench"))
            length = sum(t.numel() for t in lora_state_dict(peft_model).values())
            cond_dim = base.config.hidden_size
            rows.append(bench_cvae(cfg, length, cond_dim, args.cvae_steps))
        if "evaluate" in only:
            adapter = work / "lora" / "adapter"
            if not adapter.is_dir():
                base = load_base_model(cfg.model)
                tokenizer = load_tokenizer(cfg.model)
                blocks = token_blocks(read_splits(work / "data").train, tokenizer, cfg.data.seq_len)
                tiny = cfg.lora.model_copy(update={"steps": 2, "warmup_steps": 1, "trajectory_size": 1})
                train_lora(base, blocks, tiny, work / "lora", adapter_base_reference(cfg.model))
            rows.append(bench_eval(cfg, work / "data", adapter))

    print()
    print(f"{'stage':<10}{'wall s':>9}  {'throughput':>22}  {'bare reference':>22}  {'ratio':>6}  reference")
    for row in rows:
        if row["stage"] == "cvae":
            got, ref = f"{row['gflops']:.1f} GFLOP/s", f"{row['bare_gflops']:.1f} GFLOP/s"
        else:
            got, ref = f"{row['tokens_per_s']:.0f} tok/s", f"{row['bare_tokens_per_s']:.0f} tok/s"
        print(f"{row['stage']:<10}{row['wall_s']:>9.2f}  {got:>22}  {ref:>22}  {row['ratio']:>6.0%}  {row['bare']}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
