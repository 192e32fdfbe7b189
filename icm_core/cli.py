"""The commands that run without Prefect: one per stage, and every stage in one process (no Prefect import).

``python -m icm_core`` runs them; ``icm-lora`` (``flows/cli.py``) is the same table plus the Prefect jobs
(pipeline, generate, detect, ablations, zeroshot, registry). A command is a :class:`Command` in a table that maps
its name to it: the parser is built from the table, so the table is the one list of what the command line does.
Commands that take a run config take ``--config run.yaml`` (sections: model, data, lora, task_vector, cvae,
sample, eval) and ``--set section.field=value`` overrides; the defaults are the CPU demo on SmolLM2-135M. Only the
standard library is imported until a command runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


PROG = "icm-lora"


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


def cmd_in_process(args):
    from icm_core.in_process import run_in_process
    from icm_core.report.console import format_table

    result = run_in_process(_categories(args), _config(args), args.out, log=lambda m: print(m, file=sys.stderr))
    print(format_table(result["rows"]))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    pass


@dataclass(frozen=True)
class Command:
    """One subcommand: the function it runs, its help, and the arguments it adds to its parser."""

    run: Callable[[argparse.Namespace], int | None]
    help: str
    arguments: Callable[[argparse.ArgumentParser], None] = _no_arguments
    config: bool = True
    """It takes a run config (``--config`` and ``--set``)."""
    categories: bool = False
    """It takes ``--categories`` (a category file; default: the five built-in demo categories)."""


def _prepare_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--category", required=True)
    p.add_argument("--out", required=True, help="output folder for the splits")


def _finetune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="folder written by prepare-data")
    p.add_argument("--out", required=True, help="output trajectory folder")


def _task_vector_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--category", required=True)
    p.add_argument("--data", required=True, help="folder written by prepare-data")
    p.add_argument("--lora", help="trajectory folder (needed when task_vector.hidden_from=finetuned)")
    p.add_argument("--out", required=True, help="output .safetensors file")


def _train_generator_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lora", action="append", required=True, metavar="CATEGORY=DIR", help="trajectory (repeatable)")
    p.add_argument(
        "--task-vector", action="append", required=True, metavar="CATEGORY=FILE", help="task vector file (repeatable)"
    )
    p.add_argument("--out", required=True, help="output generator .safetensors file")


def _sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--generator", required=True)
    p.add_argument("--category", help="a category the generator was trained on")
    p.add_argument("--task-vector", help="a task vector .safetensors file instead of a category name")
    p.add_argument("--out", required=True, help="output adapter folder")


def cmd_adapt(args):
    from icm_core.zeroshot.serving import adapt_from_text

    cfg = _config(args)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ValueError(f"--out {out}: exists and is not empty; give --overwrite to replace it")
    record = adapt_from_text(args.text_dir, args.library, out, cfg.serving.selector, cfg.model)
    print(f"{'candidate':<28} {'kind':<10} {'held-out NLL':>12}  per fold")
    for row in record["scores"]:
        folds = " ".join(f"{v:.4f}" for v in row["fold_nll"])
        mark = "  <- chosen" if row["chosen"] else ""
        print(f"{row['name']:<28} {row['kind']:<10} {row['nll']:>12.4f}  {folds}{mark}")
    skipped = f"; skipped past the budget: {', '.join(record['skipped'])}" if record["skipped"] else ""
    print(
        f"winner: {record['winner']} ({record['winner_kind']}) -> {out} "
        f"({record['seconds']['total_with_load']:.1f} s in all, {record['samples']} samples{skipped})"
    )


def _adapt_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text-dir", required=True, help="the new category's text: a folder of .txt files (or a file)")
    p.add_argument("--library", required=True, help="a serving library folder (library.json; docs/zeroshot.md)")
    p.add_argument("--out", required=True, help="output adapter folder (PEFT, with selection.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True)
    p.add_argument("--adapter")
    p.add_argument("--out", help="optional JSON output file")


def _in_process_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="artifacts/in-process", help="artifacts root (default: artifacts/in-process)")
    p.add_argument("--only", help="comma-separated subset of category names")
    p.add_argument("--json", help="also write the full results as JSON here")


def _stage(run: Callable[[argparse.Namespace], int | None], help: str, arguments=_no_arguments) -> Command:
    """A command of the stage table: it takes a run config and ``--categories``, whether it reads them or not, so
    one set of options serves every stage command."""
    return Command(run, help, arguments, config=True, categories=True)


STAGE_COMMANDS: dict[str, Command] = {
    "categories": _stage(cmd_categories, "List the categories (built-in demo set or --categories file)."),
    "config": _stage(cmd_config, "Print the effective run config (defaults + --config + --set) as JSON."),
    "prepare-data": _stage(
        cmd_prepare_data,
        "Split one category's text into deterministic train/val/test splits (one stage, no Prefect).",
        _prepare_data_args,
    ),
    "finetune": _stage(
        cmd_finetune,
        "Fine-tune a LoRA adapter on a category's train split (one stage, no Prefect) and save the last "
        "checkpoints (the trajectory) plus the final adapter.",
        _finetune_args,
    ),
    "task-vector": _stage(
        cmd_task_vector,
        "Compute a category's task vector (one stage, no Prefect): the mean last-layer last-token hidden state "
        "over train samples (paper Eq. 1), or the embedding of its description.",
        _task_vector_args,
    ),
    "train-generator": _stage(
        cmd_train_generator,
        "Train one CVAE on the trajectories of all categories, conditioned on their task vectors (one stage, no "
        "Prefect).",
        _train_generator_args,
    ),
    "sample": _stage(
        cmd_sample,
        "Decode one adapter from a generator file (one stage, no Prefect): z ~ N(0, I) with a category's (or a "
        "file's) task vector, written as a PEFT adapter to --out. `generate` is the job around it: it finds the "
        "latest generator, computes a new category's vector from its text and runs as a Prefect flow.",
        _sample_args,
    ),
    "adapt": _stage(
        cmd_adapt,
        "The best adapter a serving library can give a new category, chosen on its own text (no Prefect): every "
        "candidate (stored LoRAs, k-NN, generator draws, a mix, a few-step fine-tune) scored by held-out NLL on "
        "the k samples of its task vector; prints each candidate's score and writes the winner as a PEFT folder.",
        _adapt_args,
    ),
    "evaluate": _stage(
        cmd_evaluate,
        "Score an adapter merged into the base model (one stage, no Prefect): PPL and BPC on the category's "
        "test split (no --adapter: the base model).",
        _evaluate_args,
    ),
    "in-process": _stage(
        cmd_in_process,
        "Run every stage once for all categories in this process, without Prefect, caching or resume (the "
        "reference path the benchmarks time), and print the results table. `pipeline` is the cached Prefect flow.",
        _in_process_args,
    ),
}
"""The commands that run without Prefect (``python -m icm_core``, and part of ``icm-lora``)."""


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


def short_help(text: str) -> str:
    """The listing's line of a command: its help up to the first sentence's end, colon or bracket."""
    return re.split(r"\. |: | \(|;", text, maxsplit=1)[0].rstrip(".")


def add_commands(sub: Any, commands: dict[str, Command], groups: dict[str, str] | None = None) -> None:
    """Add ``commands`` to ``sub`` (an argparse subparsers action). A name of two words (``registry scan``) is a
    subcommand of the group named by its first word, whose help ``groups`` gives."""
    group_subs: dict[str, Any] = {}
    for name, command in commands.items():
        *group, leaf = name.split()
        target = sub
        if group:
            if group[0] not in group_subs:
                text = (groups or {}).get(group[0], "")
                parser = sub.add_parser(group[0], help=short_help(text), description=text)
                group_subs[group[0]] = parser.add_subparsers(dest=f"{group[0]}_command", required=True)
            target = group_subs[group[0]]
        p = target.add_parser(leaf, help=short_help(command.help), description=command.help)
        if command.config:
            config_options(p)
        if command.categories:
            p.add_argument("--categories", help="YAML/JSON category file (default: the five built-in demo categories)")
        command.arguments(p)
        p.set_defaults(command_name=name, command_spec=command)


def build_parser(commands: dict[str, Command] | None = None, groups: dict[str, str] | None = None):
    """The parser of ``commands`` (default: the stage commands), with ``--version``."""
    from icm_core import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="ICM-LoRA: one conditional VAE that generates LoRA adapters for many tasks. The jobs (pipeline, "
        "generate, detect, ablations, zeroshot, registry) run as Prefect flows; the other commands run without "
        "Prefect. `icm-lora COMMAND --help` describes each command.",
        epilog="Bad input: one line on stderr, exit status 2. A run that fails: one line, exit status 1 "
        "(ICM_LORA_DEBUG=1 shows the traceback).",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_commands(sub, STAGE_COMMANDS if commands is None else commands, groups)
    return parser


def error_line(exc: BaseException) -> str:
    """An exception as one line (str(KeyError) adds quotes; multi-line messages are joined)."""
    message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
    return " ".join(str(message).split()) or type(exc).__name__


class RunFailed(Exception):
    """A job started and failed (exit status 1); bad input found before it started is exit status 2."""


BAD_INPUT_ERRORS = (ValueError, KeyError, FileNotFoundError, RuntimeError, ImportError, OSError)
"""What a command reports as one line with exit status 2 (bad input, a model or file that will not load)."""


def dispatch(args: argparse.Namespace) -> int:
    """Run the parsed command: 0 on success, 1 (one line) when a started run failed, 2 (one line) on bad input.
    ``ICM_LORA_DEBUG=1`` raises instead, with the traceback."""
    debug = os.environ.get("ICM_LORA_DEBUG", "") not in ("", "0")
    try:
        return args.command_spec.run(args) or 0
    except RunFailed as exc:
        if debug:
            raise
        print(f"{PROG} {args.command_name}: error: run failed: {exc}", file=sys.stderr)
        return 1
    except BAD_INPUT_ERRORS as exc:
        if debug:
            raise
        print(f"{PROG} {args.command_name}: error: {error_line(exc)}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    return dispatch(build_parser().parse_args(argv))
