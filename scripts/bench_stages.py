"""Per-stage speed against the machine: model-FLOPs utilisation (MFU), with the old bare-loop ratio beside it.

Each hot stage runs on the real SmolLM2 model and a real demo category. For each it prints the FLOPs the stage's
result needs (a documented formula), the FLOP/s achieved over the stage's wall time, the machine's peak measured in
the same run at the stage's own shapes, and their ratio (MFU):

- ``lora`` (``train_lora``: peft wrapping, AdamW, clipping, schedule, trajectory checkpoints, final adapter) and
  ``multitask_lora`` (the same on two categories' pooled blocks): FLOPs by ``icm_core.models.flops`` (forward of all
  30 layers and the head, backward through the head and the adapted layers only); peak: fp32 ``torch.mm`` at the
  model's matmul shapes (forward and input-gradient shapes, head included), FLOP-weighted. The bare reference: a
  forward + backward of the same peft model on the same blocks. ``lora_reuse``: ``train_lora`` over three epochs of
  a small block set with the frozen layers' states reused (``icm_core.models.prefix``) and without; its FLOPs are
  the whole model's, so reuse shows as a rate above what the hardware executes.
- ``evaluate`` (``evaluate_adapter``: tokenise, merge, score, restore; the layers below the adapter come from the
  prefix cache): FLOPs of the layers from the adapter's first one up and the head; peak at those forward shapes.
  Bare reference: a no-grad forward of the whole base model.
- ``task_vectors`` (``hidden_state_task_vector``, Eq. 1 over k samples): FLOPs of the 30 layers (the head is not
  needed for a hidden state); peak at those shapes.
- ``cvae`` (``train_cvae``) and ``pdiff_train`` / ``pdiff_sample`` (COND P-DIFF training and its 1000-step
  sampling): FLOPs counted by ``torch.utils.flop_counter`` over the real calls (convolutions and matmuls); peak:
  a bare fp32 conv of the network's widest layer (forward + backward for training, forward for sampling).

The language-model counts are cross-checked against ``torch.utils.flop_counter`` on one step (``counter_gflop``;
the counter does not see the fused CPU attention kernel, the formula's attention products are left out of that
comparison). Timed figures are medians of ``--repeats`` runs. Peaks are measured right after their stage, so a
busy machine lowers both sides.

    .venv/bin/python scripts/bench_stages.py [--category wikipedia] [--repeats 3] [--lora-steps 12]
        [--only lora,evaluate,...] [--json results/bench/stages.json] [--set section.field=value ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from icm_core.baselines.pdiff import train_pdiff
from icm_core.config import RunConfig, load_run_config
from icm_core.data.categories import builtin_categories
from icm_core.data.splits import read_splits
from icm_core.data.stages import prepare_data
from icm_core.data.tokens import sample_blocks, token_blocks
from icm_core.evaluation.perplexity import eval_blocks
from icm_core.evaluation.stages import evaluate_adapter
from icm_core.generator.config import SampleConfig
from icm_core.generator.cvae import ConditionalVAE, cvae_loss
from icm_core.generator.dataset import build_dataset
from icm_core.generator.task_vectors import hidden_state_task_vector
from icm_core.generator.train import train_cvae
from icm_core.lora.adapters import adapter_config_dict, adapter_first_layer, lora_config_for, lora_state_dict
from icm_core.lora.train import train_lora
from icm_core.models.base_model import adapter_base_reference, load_base_model, load_tokenizer, shared_base_model
from icm_core.models.flops import causal_lm_flops_per_token, matmul_shapes


def timed(fn: Callable[[], Any], repeats: int = 1) -> float:
    """Median wall seconds of ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def flops_of(fn: Callable[[], Any]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


# ------------------------------------------------------------------------------------------------ peaks


def mm_rate(m: int, k: int, n: int, seconds: float = 0.3) -> float:
    """FLOP/s of a bare fp32 ``torch.mm`` of [m, k] x [k, n] (median of 3 timings of ~``seconds`` each)."""
    a, b, out = torch.randn(m, k), torch.randn(k, n), torch.empty(m, n)
    torch.mm(a, b, out=out)
    flops = 2 * m * k * n
    reps = max(3, int(seconds * 150e9 / flops))
    return flops * reps / timed(lambda: [torch.mm(a, b, out=out) for _ in range(reps)], repeats=3)


def matmul_peak(shapes: list[tuple[int, int, int, int]]) -> float:
    """FLOP/s of bare fp32 matmuls over ``(M, K, N, count)`` shapes, FLOP-weighted: the set's total FLOPs over the
    total time its matmuls take at their measured rates."""
    counts: dict[tuple[int, int, int], int] = {}
    for m, k, n, count in shapes:
        counts[(m, k, n)] = counts.get((m, k, n), 0) + count
    total_flops = sum(2 * m * k * n * c for (m, k, n), c in counts.items())
    total_time = sum(2 * m * k * n * c / mm_rate(m, k, n) for (m, k, n), c in counts.items())
    return total_flops / total_time


def widest_conv(model: nn.Module, forward: Callable[[], Any]) -> tuple[nn.Module, torch.Size]:
    """The conv layer with the most multiply-adds in one ``forward()``, and its input shape."""
    seen: list[tuple[int, nn.Module, torch.Size]] = []

    def hook(module, inputs, output):
        cin, cout, k = module.in_channels, module.out_channels, module.kernel_size[0]
        seen.append((cin * cout * k * output.shape[-1] * output.shape[0] // module.groups, module, inputs[0].shape))

    convs = [m for m in model.modules() if isinstance(m, nn.Conv1d | nn.ConvTranspose1d)]
    handles = [m.register_forward_hook(hook) for m in convs]
    with torch.no_grad():
        forward()
    for h in handles:
        h.remove()
    _, module, shape = max(seen, key=lambda item: item[0])
    return module, shape


def conv_peak(layer: nn.Module, shape: torch.Size, backward: bool = True) -> tuple[float, str]:
    """FLOP/s of a bare copy of ``layer`` on a random input of ``shape`` (forward + backward, or forward only)."""
    extra = {"output_padding": layer.output_padding[0]} if isinstance(layer, nn.ConvTranspose1d) else {}
    bare = type(layer)(
        layer.in_channels,
        layer.out_channels,
        layer.kernel_size[0],
        stride=layer.stride[0],
        padding=layer.padding[0],
        groups=layer.groups,
        **extra,
    )
    name = f"{type(layer).__name__}({layer.in_channels}->{layer.out_channels}, k{layer.kernel_size[0]})"
    inp = torch.randn(shape, requires_grad=backward)

    def step() -> None:
        if backward:
            bare(inp).sum().backward()
        else:
            with torch.no_grad():
                bare(inp)

    flops = flops_of(step)
    for _ in range(3):
        step()
    reps = max(5, int(0.5 * 1e9 / max(flops, 1)))
    seconds = timed(lambda: [step() for _ in range(reps)], repeats=3) / reps
    return flops / seconds, f"{name} on {list(shape)}, {'forward + backward' if backward else 'forward'}"


def row(stage: str, flops: float, seconds: float, peak: float, peak_what: str, **extra: Any) -> dict[str, Any]:
    return {
        "stage": stage,
        "wall_s": seconds,
        "gflop": flops / 1e9,
        "flops_per_s": flops / seconds,
        "peak_flops_per_s": peak,
        "peak": peak_what,
        "ratio": flops / seconds / peak,
        **extra,
    }


# ------------------------------------------------------------------------------------------------ CVAE


def bench_cvae(cfg: RunConfig, length: int, cond_dim: int, steps: int, repeats: int) -> dict[str, Any]:
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
    rates, walls = [], []
    for _ in range(repeats):
        ends: list[float] = []
        started = time.perf_counter()
        train_cvae(weights, conds, run_cfg, on_epoch=lambda epoch, row, ends=ends: ends.append(time.perf_counter()))
        walls.append(time.perf_counter() - started)
        # The loop's rate between the first and the last epoch end: training steps only (model build, the first
        # epoch's set-up and the final BatchNorm recalibration are outside it).
        rates.append((ends[-1] - ends[0]) / ((epochs - 1) * steps_per_epoch))
    per_step = statistics.median(rates)
    layer, shape = widest_conv(model, lambda: model(x, c))
    peak, what = conv_peak(layer, shape)
    out = row("cvae", step_flops, per_step, peak, what, steps=(epochs - 1) * steps_per_epoch)
    return {**out, "wall_s": statistics.median(walls), "bare_ratio": out["ratio"]}


# ------------------------------------------------------------------------------------------------ COND P-DIFF


def bench_pdiff(cfg: RunConfig, base: nn.Module, repeats: int) -> list[dict[str, Any]]:
    """COND P-DIFF training (a shortened run: 4 autoencoder epochs, 60 denoiser steps) and its full T-step
    sampling of one adapter, on five categories x ten random checkpoints of the demo's LoRA layout."""
    from peft import get_peft_model

    lora = get_peft_model(base, lora_config_for(base, cfg.lora, "bench"))
    template = lora_state_dict(lora)
    gen = torch.Generator().manual_seed(0)
    names = [f"c{i}" for i in range(5)]
    checkpoints = {
        name: [{k: torch.randn(v.shape, generator=gen) * 0.01 for k, v in template.items()} for _ in range(10)]
        for name in names
    }
    vectors = {name: torch.randn(base.config.hidden_size, generator=gen) for name in names}
    dataset = build_dataset(checkpoints, vectors)
    adapter_cfg = adapter_config_dict(lora, "bench")
    pcfg = cfg.pdiff.model_copy(update={"ae_epochs": 4, "ddpm_steps": 60, "log_every": 20})

    def train() -> Any:
        return train_pdiff(dataset, pcfg, adapter_cfg)[0]

    train_flops = flops_of(train)
    train()  # warm-up
    train_s = timed(train, repeats)
    model = train()
    ae, unet = model.autoencoder, model.denoiser
    sample_cfg = SampleConfig(seed=0)
    sample_flops = flops_of(lambda: model.generate(names[:1], sample_cfg))
    sample_s = timed(lambda: model.generate(names[:1], sample_cfg), repeats)

    x = dataset.weights[: pcfg.batch_size]
    layer, shape = widest_conv(ae, lambda: ae(model.norm.normalize(x, dataset.row_category[: len(x)])))
    latents = torch.randn(1, *unet.latent_shape)
    cond = torch.randn(1, unet.cond_dim)
    ulayer, ushape = widest_conv(unet, lambda: unet(latents, torch.zeros(1, dtype=torch.long), cond))
    train_peak, train_what = conv_peak(layer, shape)
    sample_peak, sample_what = conv_peak(ulayer, ushape, backward=False)
    return [
        row("pdiff_train", train_flops, train_s, train_peak, train_what, ae_epochs=4, ddpm_steps=60),
        row("pdiff_sample", sample_flops, sample_s, sample_peak, sample_what, timesteps=pcfg.timesteps),
    ]


# ------------------------------------------------------------------------------------------------ LoRA


def lm_rows(cfg: RunConfig) -> int:
    return cfg.lora.batch_size * cfg.data.seq_len


def lora_flops(config: Any, seq_len: int, lora_cfg: Any, attention: bool = True) -> tuple[float, int]:
    """Model FLOPs per token of one LoRA training step, and the lowest adapted layer."""
    train_from = config.num_hidden_layers - (lora_cfg.last_n_layers or config.num_hidden_layers)
    per_token = causal_lm_flops_per_token(
        config,
        seq_len,
        train_from=train_from,
        lora_rank=lora_cfg.rank,
        lora_targets=lora_cfg.target_modules,
        attention=attention,
    )
    return per_token, train_from


def lora_peak(config: Any, cfg: RunConfig, train_from: int) -> tuple[float, str]:
    """The matmul peak at a LoRA step's shapes, and what it was measured on."""
    what = f"fp32 mm at the model's shapes, M={lm_rows(cfg)}, fwd + input grads from layer {train_from}"
    return matmul_peak(matmul_shapes(config, lm_rows(cfg), train_from=train_from)), what


def bench_lora(
    cfg: RunConfig, blocks: torch.Tensor, work: Path, steps: int, repeats: int, stage: str = "lora"
) -> dict[str, Any]:
    from peft import get_peft_model

    lora_cfg = cfg.lora.model_copy(update={"steps": steps, "warmup_steps": 1, "trajectory_size": min(10, steps)})
    tokens = steps * lora_cfg.batch_size * cfg.data.seq_len
    warm = lora_cfg.model_copy(update={"steps": 2, "trajectory_size": 1})
    train_lora(load_base_model(cfg.model), blocks, warm, work / f"{stage}-warm", adapter_base_reference(cfg.model))
    walls = []
    for i in range(repeats):
        base = load_base_model(cfg.model)
        started = time.perf_counter()
        train_lora(base, blocks, lora_cfg, work / f"{stage}-{i}", adapter_base_reference(cfg.model))
        walls.append(time.perf_counter() - started)
    seconds = statistics.median(walls)

    torch.manual_seed(lora_cfg.seed)
    bare_base = load_base_model(cfg.model)
    config = bare_base.config
    model = get_peft_model(bare_base, lora_config_for(bare_base, lora_cfg, "bench"))
    model.train()
    batches = [blocks[i % blocks.shape[0] : i % blocks.shape[0] + lora_cfg.batch_size] for i in range(steps)]
    batches = [b if b.shape[0] == lora_cfg.batch_size else blocks[: lora_cfg.batch_size] for b in batches]

    def bare() -> None:
        for b in batches:
            model(input_ids=b, labels=b).loss.backward()

    counted = flops_of(lambda: model(input_ids=batches[0], labels=batches[0]).loss.backward())
    bare_seconds = timed(bare)
    per_token, train_from = lora_flops(config, cfg.data.seq_len, lora_cfg)
    no_attention = lora_flops(config, cfg.data.seq_len, lora_cfg, attention=False)[0]
    peak, what = lora_peak(config, cfg, train_from)
    return row(
        stage,
        per_token * tokens,
        seconds,
        peak,
        what,
        steps=steps,
        blocks=int(blocks.shape[0]),
        tokens_per_s=tokens / seconds,
        gflop_per_token=per_token / 1e9,
        formula_vs_counter=no_attention * lora_cfg.batch_size * cfg.data.seq_len / counted,
        bare="peft model forward + backward, same blocks",
        bare_tokens_per_s=tokens / bare_seconds,
        bare_ratio=bare_seconds / seconds,
    )


def bench_lora_reuse(cfg: RunConfig, blocks: torch.Tensor, work: Path, steps: int, repeats: int) -> dict[str, Any]:
    """``train_lora`` over three epochs of a small block set (like the demo's ``reviews``: 49 blocks, 160 block
    passes), with the frozen layers' states reused (the default) and without; FLOPs: the whole-model count (the
    work the result stands for), so the reuse shows as a higher rate."""
    lora_cfg = cfg.lora.model_copy(update={"steps": steps, "warmup_steps": 1, "trajectory_size": min(10, steps)})
    small = blocks[: max(1, steps * lora_cfg.batch_size // 3)]
    walls: dict[bool, list[float]] = {True: [], False: []}
    for i in range(repeats + 1):  # the first pair is a warm-up
        for reuse in (True, False):
            base = load_base_model(cfg.model)
            started = time.perf_counter()
            out = work / f"reuse-{reuse}-{i}"
            train_lora(base, small, lora_cfg, out, adapter_base_reference(cfg.model), reuse_prefix=reuse)
            if i:
                walls[reuse].append(time.perf_counter() - started)
    config = load_base_model(cfg.model).config
    per_token, train_from = lora_flops(config, cfg.data.seq_len, lora_cfg)
    tokens = steps * lora_cfg.batch_size * cfg.data.seq_len
    peak, what = lora_peak(config, cfg, train_from)
    reused, whole = statistics.median(walls[True]), statistics.median(walls[False])
    return row(
        "lora_reuse",
        per_token * tokens,
        reused,
        peak,
        what,
        steps=steps,
        blocks=int(small.shape[0]),
        without_reuse_wall_s=whole,
        speedup=whole / reused,
        ratio_without_reuse=per_token * tokens / whole / peak,
    )


# ------------------------------------------------------------------------------------------ evaluation


def bench_eval(cfg: RunConfig, data_dir: Path, adapter_dir: Path, repeats: int) -> dict[str, Any]:
    tokenizer = load_tokenizer(cfg.model)
    blocks = eval_blocks(read_splits(data_dir).test, tokenizer, cfg.data.seq_len, cfg.eval.max_tokens)
    tokens = blocks.input_ids.numel()
    evaluate_adapter(data_dir, adapter_dir, cfg.model, cfg.data, cfg.eval)  # loads the shared base model once
    seconds = timed(lambda: evaluate_adapter(data_dir, adapter_dir, cfg.model, cfg.data, cfg.eval), repeats)
    start = adapter_first_layer(adapter_dir)

    with shared_base_model(cfg.model) as model:
        config = model.config

        @torch.no_grad()
        def bare() -> None:
            for batch in blocks.input_ids.split(cfg.eval.batch_size):
                model(input_ids=batch)

        bare_seconds = timed(bare, repeats)
    per_token = causal_lm_flops_per_token(config, cfg.data.seq_len, first_layer=start)
    rows = cfg.eval.batch_size * cfg.data.seq_len
    peak = matmul_peak(matmul_shapes(config, rows, first_layer=start))
    return row(
        "evaluate",
        per_token * tokens,
        seconds,
        peak,
        f"fp32 mm at the model's shapes, M={rows}, layers {start}.. and head",
        tokens=tokens,
        first_layer=start,
        tokens_per_s=tokens / seconds,
        whole_model_flops_per_s=causal_lm_flops_per_token(config, cfg.data.seq_len) * tokens / seconds,
        bare="base model no-grad forward, same blocks",
        bare_tokens_per_s=tokens / bare_seconds,
        bare_ratio=bare_seconds / seconds,
    )


def bench_task_vectors(cfg: RunConfig, train_texts: list[str], repeats: int) -> dict[str, Any]:
    tv = cfg.task_vector
    tokenizer = load_tokenizer(cfg.model)
    blocks = sample_blocks(token_blocks(train_texts, tokenizer, tv.sample_tokens), tv.num_samples, 0)
    tokens = blocks.numel()
    with shared_base_model(cfg.model) as model:
        config = model.config
        hidden_state_task_vector(model, blocks)
        seconds = timed(lambda: hidden_state_task_vector(model, blocks), repeats)

        @torch.no_grad()
        def bare() -> None:
            for batch in blocks.split(8):
                model(input_ids=batch)

        bare_seconds = timed(bare, repeats)
    per_token = causal_lm_flops_per_token(config, tv.sample_tokens, head=False)
    rows = 8 * tv.sample_tokens
    peak = matmul_peak(matmul_shapes(config, rows, head=False))
    return row(
        "task_vectors",
        per_token * tokens,
        seconds,
        peak,
        f"fp32 mm at the model's shapes, M={rows}, no head",
        tokens=tokens,
        tokens_per_s=tokens / seconds,
        bare="base model no-grad forward (with head), same blocks",
        bare_tokens_per_s=tokens / bare_seconds,
        bare_ratio=bare_seconds / seconds,
    )


# ------------------------------------------------------------------------------------------------ main


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return f"{cpu}; {torch.get_num_threads()} torch threads; torch {torch.__version__}"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


STAGES = ("lora", "multitask_lora", "lora_reuse", "evaluate", "task_vectors", "cvae", "pdiff")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--category", default="wikipedia")
    parser.add_argument("--pool-with", default="news", help="second category of the multi-task LoRA's pool")
    parser.add_argument("--cvae-steps", type=int, default=30, help="CVAE optimizer steps timed")
    parser.add_argument("--lora-steps", type=int, default=12, help="LoRA optimizer steps timed")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per stage (the median is quoted)")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    cfg = load_run_config(args.config, args.set)
    only = set(args.only.split(",")) if args.only else set(STAGES)
    by_name = {c.name: c for c in builtin_categories()}
    category = by_name[args.category]
    print(f"{machine()}; category {category.name}", flush=True)

    rows: list[dict[str, Any]] = []
    started = time.perf_counter()

    def add(*new: dict[str, Any]) -> None:
        for item in new:
            rows.append(item)
            print(
                f"{item['stage']}: {item['flops_per_s'] / 1e9:.1f} GFLOP/s of {item['peak_flops_per_s'] / 1e9:.1f} "
                f"(wall {item['wall_s']:.1f} s; {time.perf_counter() - started:.0f} s in)",
                flush=True,
            )
        if args.json:  # after every stage, so an interrupted run keeps what it measured
            payload = {
                "commit": commit(),
                "machine": machine(),
                "wall_s": time.perf_counter() - started,
                "stages": {r["stage"]: r for r in rows},
            }
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")

    with tempfile.TemporaryDirectory(prefix="icm-bench-stages-") as tmp:
        work = Path(tmp)
        prepare_data(category, cfg.data, work / "data")
        tokenizer = load_tokenizer(cfg.model)
        blocks = token_blocks(read_splits(work / "data").train, tokenizer, cfg.data.seq_len)
        if "lora" in only:
            add(bench_lora(cfg, blocks, work, args.lora_steps, args.repeats))
        if "lora_reuse" in only:
            add(bench_lora_reuse(cfg, blocks, work, args.lora_steps, args.repeats))
        if "multitask_lora" in only:
            prepare_data(by_name[args.pool_with], cfg.data, work / "pool")
            pooled = torch.cat([blocks, token_blocks(read_splits(work / "pool").train, tokenizer, cfg.data.seq_len)])
            add(bench_lora(cfg, pooled, work, args.lora_steps, args.repeats, stage="multitask_lora"))
        if "evaluate" in only:
            adapter = work / "lora-0" / "adapter"
            if not adapter.is_dir():
                tiny = cfg.lora.model_copy(update={"steps": 2, "warmup_steps": 1, "trajectory_size": 1})
                base_id = adapter_base_reference(cfg.model)
                train_lora(load_base_model(cfg.model), blocks, tiny, work / "lora-0", base_id)
            add(bench_eval(cfg, work / "data", adapter, args.repeats))
        if "task_vectors" in only:
            add(bench_task_vectors(cfg, read_splits(work / "data").train, args.repeats))
        if "cvae" in only or "pdiff" in only:
            from peft import get_peft_model

            base = load_base_model(cfg.model)
            if "cvae" in only:
                # The demo's flattened LoRA length: read it off a real adapter of the configured LoRA.
                peft_model = get_peft_model(load_base_model(cfg.model), lora_config_for(base, cfg.lora, "bench"))
                length = sum(t.numel() for t in lora_state_dict(peft_model).values())
                add(bench_cvae(cfg, length, base.config.hidden_size, args.cvae_steps, args.repeats))
            if "pdiff" in only:
                add(*bench_pdiff(cfg, base, args.repeats))
    wall = time.perf_counter() - started

    print()
    print(f"{'stage':<15}{'wall s':>8}{'GFLOP':>9}{'GFLOP/s':>9}{'peak':>8}{'MFU':>6}{'bare':>6}  peak measured on")
    for r in rows:
        bare = f"{r['bare_ratio']:>6.0%}" if "bare_ratio" in r else f"{'':>6}"
        print(
            f"{r['stage']:<15}{r['wall_s']:>8.2f}{r['gflop']:>9.1f}{r['flops_per_s'] / 1e9:>9.1f}"
            f"{r['peak_flops_per_s'] / 1e9:>8.1f}{r['ratio']:>6.0%}{bare}  {r['peak']}"
        )
    print(f"\nbenchmark wall time {wall:.0f} s")


if __name__ == "__main__":
    main()
