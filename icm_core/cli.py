"""``python -m icm_core``: one subcommand per stage, usable without Prefect (no Prefect import).

The same stage subcommands are part of ``icm-lora`` (``flows/cli.py``), which adds the Prefect jobs
(pipeline, generate, detect, ablations, registry). Every subcommand takes ``--config run.yaml`` (sections:
model, data, lora, task_vector, cvae, sample, eval) and ``--set section.field=value`` overrides; the
defaults are the CPU demo on SmolLM2-135M. Only the standard library is imported until a command runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _categories(args: argparse.Namespace):
    from icm_core.data.categories import builtin_categories, load_category_file

    categories = load_category_file(args.categories) if args.categories else builtin_categories()
    if getattr(args, "only", None):
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        known = {c.name: c for c in categories}
        unknown = [n for n in wanted if n not in known]
        if unknown:
            raise ValueError(f"--only: unknown categories {unknown}; known: {sorted(known)}")
        categories = [known[n] for n in wanted]
    return categories


def _category(args: argparse.Namespace):
    matches = [c for c in _categories(args) if c.name == args.category]
    if not matches:
        raise ValueError(f"--category: unknown category {args.category!r}")
    return matches[0]


def _config(args: argparse.Namespace):
    from icm_core.config import load_run_config

    return load_run_config(args.config, args.set)


def _print(payload: Any) -> None:
    print(json.dumps(payload, indent=2, default=str))


def cmd_categories(args):
    for c in _categories(args):
        print(f"{c.name:<14} {c.source:<22} {c.description}")


def cmd_config(args):
    print(_config(args).model_dump_json(indent=2))


def cmd_prepare_data(args):
    from icm_core.data.stages import prepare_data

    _print(prepare_data(_category(args), _config(args).data, args.out))


def cmd_finetune(args):
    from icm_core.lora.stages import finetune_lora

    cfg = _config(args)

    def on_step(step: int, loss: float) -> None:
        if step % 10 == 0 or step == cfg.lora.steps:
            print(f"step {step}/{cfg.lora.steps} loss {loss:.4f}", file=sys.stderr)

    _print(finetune_lora(args.data, cfg.model, cfg.data, cfg.lora, args.out, on_step=on_step))


def cmd_task_vector(args):
    from icm_core.generator.stages import compute_task_vector

    cfg = _config(args)
    _print(compute_task_vector(_category(args), args.data, args.lora, cfg.model, cfg.data, cfg.task_vector, args.out))


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"{flag} {item!r}: expected CATEGORY=PATH")
        name, path = item.split("=", 1)
        out[name] = path
    return out


def cmd_train_generator(args):
    from icm_core.generator.stages import train_generator_stage

    cfg = _config(args)

    def on_epoch(epoch: int, row: dict) -> None:
        epoch += 1  # train_cvae counts epochs from 0
        if epoch % 20 == 0 or epoch == cfg.cvae.epochs:
            print(f"epoch {epoch}/{cfg.cvae.epochs} recon {row['recon']:.5f} kld {row['kld']:.3f}", file=sys.stderr)

    _print(
        train_generator_stage(
            _pairs(args.lora, "--lora"),
            _pairs(args.task_vector, "--task-vector"),
            cfg.cvae,
            args.out,
            on_epoch=on_epoch,
        )
    )


def cmd_sample(args):
    from icm_core.generator.stages import sample_adapter
    from icm_core.generator.task_vectors import load_task_vector_with_kind

    cfg = _config(args)
    vector, kind = load_task_vector_with_kind(args.task_vector) if args.task_vector else (None, None)
    if vector is None and not args.category:
        raise ValueError("sample: give --category or --task-vector")
    _print(
        sample_adapter(
            args.generator,
            args.out,
            cfg.sample,
            category=args.category,
            task_vector=vector,
            task_vector_source=args.task_vector,
            task_vector_kind=kind,
        )
    )


def cmd_evaluate(args):
    from icm_core.evaluation.stages import evaluate_adapter

    cfg = _config(args)
    _print(evaluate_adapter(args.data, args.adapter, cfg.model, cfg.data, cfg.eval, args.out))


def cmd_run(args):
    from icm_core.local_pipeline import format_table, run_all

    result = run_all(_categories(args), _config(args), args.out, log=lambda m: print(m, file=sys.stderr))
    print(format_table(result["rows"]))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))


STAGE_COMMANDS = (
    "categories",
    "config",
    "prepare-data",
    "finetune",
    "task-vector",
    "train-generator",
    "sample",
    "evaluate",
    "run",
)


def config_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--config`` and ``--set``, shared by every command that takes a run config."""
    parser.add_argument(
        "--config",
        help="YAML/JSON run config with sections model, data, lora, task_vector, cvae, "
        "sample, eval (default: the built-in CPU demo settings)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override one config field, e.g. --set lora.steps=20 (repeatable)",
    )
    return parser


def common_parser() -> argparse.ArgumentParser:
    common = config_options(argparse.ArgumentParser(add_help=False))
    common.add_argument("--categories", help="YAML/JSON category file (default: the five built-in demo categories)")
    return common


def add_stage_commands(sub, common: argparse.ArgumentParser) -> None:
    """Add the stage subcommands (:data:`STAGE_COMMANDS`) to ``sub`` (an argparse subparsers action)."""

    def add(name: str, fn, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help_text, description=help_text)
        p.set_defaults(fn=fn)
        return p

    add("categories", cmd_categories, "List the categories (built-in demo set or --categories file).")
    add("config", cmd_config, "Print the effective run config (defaults + --config + --set) as JSON.")
    p = add(
        "prepare-data", cmd_prepare_data, "Read one category's text and write deterministic train/val/test splits."
    )
    p.add_argument("--category", required=True)
    p.add_argument("--out", required=True, help="output folder for the splits")
    p = add(
        "finetune",
        cmd_finetune,
        "Fine-tune a LoRA adapter on a category's train split and save the last "
        "checkpoints (the trajectory) plus the final adapter.",
    )
    p.add_argument("--data", required=True, help="folder written by prepare-data")
    p.add_argument("--out", required=True, help="output trajectory folder")
    p = add(
        "task-vector",
        cmd_task_vector,
        "Compute a category's task vector: mean last-layer last-token hidden "
        "state over train samples (paper Eq. 1), or the embedding of its description.",
    )
    p.add_argument("--category", required=True)
    p.add_argument("--data", required=True, help="folder written by prepare-data")
    p.add_argument("--lora", help="trajectory folder (needed when task_vector.hidden_from=finetuned)")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p = add(
        "train-generator",
        cmd_train_generator,
        "Train one CVAE on the trajectories of all categories, conditioned on their task vectors.",
    )
    p.add_argument("--lora", action="append", required=True, metavar="CATEGORY=DIR", help="trajectory (repeatable)")
    p.add_argument(
        "--task-vector", action="append", required=True, metavar="CATEGORY=FILE", help="task vector file (repeatable)"
    )
    p.add_argument("--out", required=True, help="output generator .safetensors file")
    p = add("sample", cmd_sample, "Draw z ~ N(0, I), decode with a task vector and write a PEFT adapter folder.")
    p.add_argument("--generator", required=True)
    p.add_argument("--category", help="a category the generator was trained on")
    p.add_argument("--task-vector", help="a task vector .safetensors file instead of a category name")
    p.add_argument("--out", required=True, help="output adapter folder")
    p = add(
        "evaluate",
        cmd_evaluate,
        "Merge an adapter into the base model and report PPL and BPC on the "
        "category's test split (no --adapter: the base model).",
    )
    p.add_argument("--data", required=True)
    p.add_argument("--adapter")
    p.add_argument("--out", help="optional JSON output file")
    p = add("run", cmd_run, "Run every stage for all categories in this process and print the results table.")
    p.add_argument("--out", default="artifacts/core-run", help="artifacts root (default: artifacts/core-run)")
    p.add_argument("--only", help="comma-separated subset of category names")
    p.add_argument("--json", help="also write the full results as JSON here")


def build_parser() -> argparse.ArgumentParser:
    from icm_core import __version__

    parser = argparse.ArgumentParser(
        prog="icm-lora",
        description="ICM-LoRA stages without Prefect: fine-tune LoRA per category, compute task vectors, train "
        "one CVAE generator for all categories, sample PEFT adapters and evaluate PPL/BPC. The installed "
        "`icm-lora` command has the same subcommands plus the Prefect jobs (pipeline, generate, ...).",
    )
    parser.add_argument("--version", action="version", version=f"icm-lora {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_stage_commands(sub, common_parser())
    return parser


def error_line(exc: BaseException) -> str:
    """An exception as one line (str(KeyError) adds quotes; multi-line messages are joined)."""
    message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
    return " ".join(str(message).split()) or type(exc).__name__


STAGE_ERRORS = (ValueError, KeyError, FileNotFoundError, RuntimeError)
"""What a stage command reports as one line with exit status 2 (bad input, a model or file that will not load)."""


def run_stage_command(args: argparse.Namespace, prog: str = "icm-lora") -> int:
    try:
        args.fn(args)
    except STAGE_ERRORS as exc:
        print(f"{prog} {args.command}: error: {error_line(exc)}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_stage_command(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
