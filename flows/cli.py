"""``icm-lora``: the one command line for every job, built from one table (:data:`COMMANDS`).

    icm-lora pipeline      the full Prefect pipeline (what ``make demo`` runs)
    icm-lora generate      a PEFT adapter from the trained generator (category, description, task vector, or a
                           new category's text)
    icm-lora detect        ICM-LoRA on detection tasks (docs/vision.md)
    icm-lora ablations     the ablations (paper Tables 4-6)
    icm-lora zeroshot      the leave-out protocol: adapters for categories the generator never saw
    icm-lora registry scan | retrain   the category registry: emit change events, retrain after a change
    icm-lora categories | config | prepare-data | finetune | task-vector | train-generator | sample |
             evaluate | in-process     without Prefect (``icm_core/cli.py``; also ``python -m icm_core``)

Only the standard library is imported until a command runs: ``--help`` and ``--version`` do not load
torch or Prefect (``make bench-cli`` measures it). Every command checks its input before anything starts
(no temporary Prefect server for a bad category file): bad input is one line on stderr and exit status 2;
a run that starts and fails is one line and exit status 1 (``ICM_LORA_DEBUG=1`` shows the traceback). The
flows never import this module: it imports them, when a command runs.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from icm_core.cli import STAGE_COMMANDS, Command, RunFailed, dispatch, error_line
from icm_core.cli import build_parser as build_command_parser


RUNNERS = ("threads", "dask", "ray")  # flows.runtime.RUNNERS, repeated so that --help imports no Prefect


def _names(text: str | None) -> list[str] | None:
    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    return names or None


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{flag}: expected comma-separated integers, got {text!r}") from None


def _run(flow_call, *args: Any, **kwargs: Any) -> Any:
    """Call a flow; any failure inside the run becomes :class:`RunFailed` (exit status 1)."""
    try:
        return flow_call(*args, **kwargs)
    except Exception as exc:  # the flow's own exception type, re-raised by Prefect
        raise RunFailed(error_line(exc)) from exc


# --------------------------------------------------------------------------------------------------
# Commands (each imports what it needs when it runs)
# --------------------------------------------------------------------------------------------------


def cmd_pipeline(args: argparse.Namespace) -> int:
    from flows import run_record
    from flows.runtime import device_from_env
    from icm_core.config import load_run_config
    from icm_core.data.selection import check_category_sources, select_categories

    cfg = load_run_config(args.config, args.set + ([f"seeds={args.seeds}"] if args.seeds else []))
    worker_cfg = device_from_env(cfg)  # the config as the flow will see it
    only = _names(args.only)
    # A bad category file or a missing/empty source fails here, before a Prefect server or flow run starts.
    categories = check_category_sources(select_categories(args.categories, only))
    # Nothing changed since a finished run with the same key: print its summary, start no server.
    key = run_record.run_key(worker_cfg, categories, only, args.root)
    summary = None if args.rerun or args.verify else run_record.find(args.root, key)
    if summary is not None:
        from tasks.store import write_root_json

        write_root_json(args.root, "latest.json", summary)  # what a flow run would have pointed it at
        print(f"up to date: every stage of this run is cached (run record {run_record.record_path(args.root, key)}; "
              "--rerun runs the flow anyway)")  # fmt: skip
    else:  # torch, Prefect and the models load from here on, not on the path above (make bench-warm)
        from flows.pipeline import icm_pipeline
        from flows.runtime import make_task_runner
        from icm_core.models.base_model import resolve_device

        resolve_device(worker_cfg.model.device)  # a bad or missing device fails before a server starts
        runner = make_task_runner(args.runner, args.runner_address, args.workers)
        summary = _run(
            icm_pipeline.with_options(task_runner=runner),
            config=cfg,
            categories_file=args.categories,
            only=only,
            root=args.root,
            verify=args.verify,
        )
        run_record.write(args.root, key, summary)
    _print_summary(summary, args.results_dir)
    return 0


def _print_summary(summary: dict[str, Any], results_dir: str | None) -> None:
    from icm_core.report.console import format_table

    print()
    print(format_table(summary["rows"]))
    print()
    print(f"report:    {summary['report']}")
    if results_dir:
        from flows.pipeline import copy_report

        print(f"copied:    {copy_report(summary['report_dir'], results_dir)}")
    print(f"generator: {summary['generator']}")
    print("adapters:")
    for row in summary["rows"]:
        print(f"  {row['category']:<14} {row['adapter_dir']}")


def cmd_generate(args: argparse.Namespace) -> int:
    from flows.generate import generate_adapter, latest_generator
    from icm_core.generator.config import SampleConfig
    from icm_core.models.config import ModelConfig

    if args.task_vector_file and not Path(args.task_vector_file).is_file():
        raise FileNotFoundError(f"--task-vector {args.task_vector_file}: no such file")
    if args.text_dir and not Path(args.text_dir).is_dir():
        raise FileNotFoundError(f"--text-dir {args.text_dir}: no such folder (the new category's .txt files)")
    if args.text_file and not Path(args.text_file).is_file():
        raise FileNotFoundError(f"--text {args.text_file}: no such file (the new category's text)")
    if args.samples is not None and args.samples < 1:
        raise ValueError(f"--samples: k must be at least 1, got {args.samples}")
    if args.generator:
        if not Path(args.generator).is_file():
            raise FileNotFoundError(f"--generator {args.generator}: no such file")
    else:
        latest_generator(args.root)  # no pipeline run under the root yet: say so before starting a flow run
    sample = SampleConfig(seed=args.seed)
    text = args.text_dir or args.text_file
    if text:
        from icm_core.zeroshot.from_text import plan_text_vector, read_text_source

        # The generator's vector kind and the text are checked here: bad input is exit status 2, no flow run.
        generator = args.generator or str(latest_generator(args.root))
        plan = plan_text_vector(generator, num_samples=args.samples)
        if not plan.uses_text:
            raise ValueError(
                f"{generator}: trained on description vectors ({plan.kind!r}); give the new category's one-line "
                "description (--description), not its text"
            )
        read_text_source(text)
    result = _run(
        generate_adapter,
        category=args.category,
        description=args.description,
        task_vector_file=args.task_vector_file,
        out=args.out,
        generator=args.generator,
        sample=sample,
        root=args.root,
        base_model=args.base_model,
        overwrite=args.overwrite,
        text=text,
        model=ModelConfig(device=args.device),
        num_samples=args.samples,
    )
    print(result["adapter_dir"])
    return 0


def cmd_detect(args: argparse.Namespace) -> int:
    import shutil

    from flows.detection import detection_pipeline, load_detection_config
    from icm_core.report.detection import table_markdown

    cfg = load_detection_config(args.config, args.set)
    summary = _run(detection_pipeline, config=cfg, root=args.root)
    print()
    print(table_markdown(summary["rows"]))
    print()
    print(f"report: {summary['report']}")
    if args.results_dir:
        target = Path(args.results_dir)
        target.mkdir(parents=True, exist_ok=True)
        folder = Path(summary["report_dir"])
        copies = [
            ("report.md", "detection-report.md"),
            ("results.csv", "detection-results.csv"),
            ("results.json", "detection-results.json"),
            ("detection_results.png", "detection_results.png"),  # the name report.md links to
        ]
        for src, dst in copies:
            if (folder / src).is_file():
                shutil.copyfile(folder / src, target / dst)
        print(f"copied to {target}: " + ", ".join(dst for src, dst in copies if (folder / src).is_file()))
    return 0


def cmd_ablations(args: argparse.Namespace) -> int:
    from flows.ablations import ablation_variants, icm_ablations
    from icm_core.config import load_run_config

    cfg = load_run_config(args.config, args.set)
    ranks, depths = _ints(args.ranks, "--ranks"), _ints(args.depths, "--depths")
    depth_ranks = _ints(args.depth_ranks, "--depth-ranks")
    sources = _names(args.sources) or []
    ablation_variants(cfg, ranks, depths, depth_ranks, sources)  # validate before starting anything
    out = _run(
        icm_ablations,
        config=cfg,
        categories_file=args.categories,
        only=_names(args.only),
        ranks=ranks,
        depths=depths,
        depth_ranks=depth_ranks,
        sources=sources,
        root=args.root,
    )
    print(Path(out["report"]).read_text())
    print(f"ablation report: {out['report']}")
    return 0


def cmd_zeroshot(args: argparse.Namespace) -> int:
    from flows.zeroshot import select, zeroshot_protocol
    from icm_core.config import load_run_config
    from icm_core.zeroshot.config import ZeroShotRunConfig

    cfg = load_run_config(args.config, args.set, config_cls=ZeroShotRunConfig)
    only = _names(args.only)
    select(args.categories, only)  # unknown categories fail here, before any flow run starts
    out = _run(
        zeroshot_protocol,
        config=cfg,
        categories_file=args.categories,
        only=only,
        root=args.root,
        results_dir=args.results,
    )
    print(Path(out["files"]["report"]).read_text(encoding="utf-8"))
    return 0


def cmd_registry_scan(args: argparse.Namespace) -> int:
    from flows.retrain import scan_categories
    from icm_core.data.registry import load_registry

    load_registry(args.registry)  # a missing or invalid registry fails here, before a flow run
    result = _run(scan_categories, registry=args.registry, root=args.root, baseline=args.baseline)
    for change in ("added", "removed", "changed"):
        print(f"{change:>8}: {', '.join(result[change]) or '-'}")
    return 0


def cmd_registry_retrain(args: argparse.Namespace) -> int:
    from flows.retrain import retrain_categories
    from flows.runtime import device_from_env
    from icm_core.config import load_run_config
    from icm_core.data.registry import load_registry
    from icm_core.data.selection import check_category_sources
    from icm_core.models.base_model import resolve_device

    cfg = load_run_config(args.config, args.set)
    resolve_device(device_from_env(cfg).model.device)
    check_category_sources(load_registry(args.registry))
    if args.baseline and args.category:
        raise ValueError("--baseline retrains the whole registry; it takes no --category")
    summary = _run(
        retrain_categories,
        category=args.category,
        change=args.change,
        registry=args.registry,
        root=args.root,
        config=cfg,
        baseline=args.baseline,
        zero_shot=not args.no_zero_shot,
    )
    if summary.get("zero_shot"):
        early = summary["zero_shot"]
        print(f"selected: {early['winner']} {early['adapter_dir']} (published before the retrain, now replaced)")
    print(f"report: {summary['report']}")
    return 0


# --------------------------------------------------------------------------------------------------
# Arguments of each command, and the table
# --------------------------------------------------------------------------------------------------


def _pipeline_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--categories", help="category file or folder (default: the five built-in demo categories)")
    p.add_argument("--only", help="comma-separated category names")
    p.add_argument("--root", default="artifacts", help="artifacts folder or fsspec URL (default: artifacts)")
    p.add_argument("--runner", choices=RUNNERS, default="threads", help="task runner (default: threads)")
    p.add_argument("--runner-address", help="Dask scheduler / Ray address (default: start a local cluster)")
    p.add_argument("--workers", type=int, help="local cluster size / thread pool size (threads: min(32, cores + 4))")
    p.add_argument("--seeds", type=int, help="run with this many seeds (= --set seeds=N; default 1)")
    p.add_argument("--results-dir", help="also copy the report's files (report.md, results.*, figures) here")
    p.add_argument(
        "--verify",
        action="store_true",
        help="re-hash every reused output and model file (slow; default: sizes + mtimes); always runs the flow",
    )
    p.add_argument(
        "--rerun",
        action="store_true",
        help="run the flow even when a finished run with the same key is recorded (default: print that run's "
        "summary without starting Prefect; flows/run_record.py)",
    )


def _generate_args(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--category", help="a category the generator was trained on")
    group.add_argument("--description", help="a task description (generators trained on description vectors)")
    group.add_argument("--task-vector", dest="task_vector_file", help="a .safetensors file with a task_vector")
    group.add_argument(
        "--text-dir",
        help="a new category's text: a folder of .txt files; its task vector is computed from it (Eq. 1 on the "
        "base model; the generator must be trained with task_vector.hidden_from=base)",
    )
    group.add_argument("--text", dest="text_file", help="a new category's text: one .txt (or .jsonl) file")
    p.add_argument(
        "--samples",
        type=int,
        help="k, the text samples averaged for --text/--text-dir (default: the generator's training value)",
    )
    p.add_argument("--device", default="auto", help="device for the base model of --text/--text-dir (default: auto)")
    p.add_argument(
        "--out",
        help="output adapter folder (default: <root>/generated/<generator>/<condition>/seed-<s>-draws-<n>/adapter, "
        "one folder per generator and condition)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--generator", help="generator .safetensors file (default: the latest run's under --root)")
    p.add_argument("--seed", type=int, default=0, help="seed of z ~ N(0, I) (default: 0)")
    p.add_argument("--root", default="artifacts", help="artifacts root (default: artifacts)")
    p.add_argument(
        "--base-model",
        help="what the adapter's base_model_name_or_path names (default: what the generator's training "
        "recorded, a hub id or model folder transformers can load)",
    )


def _detect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", default="artifacts/detection", help="artifacts root (default: artifacts/detection)")
    p.add_argument(
        "--results-dir",
        help="also copy report.md / results.csv / results.json / the figure here "
        "(as detection-report.md, detection-results.csv, detection-results.json, detection_results.png)",
    )


def _ablations_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--categories", help="category file (default: the built-in demo categories)")
    p.add_argument("--only", default="news,python-docs", help="comma-separated categories ('' = all)")
    p.add_argument("--ranks", default="1,2,4,8", help="LoRA ranks (Table 4)")
    p.add_argument("--depths", default="4,8,12", help="CVAE conv-layer counts (Table 5)")
    p.add_argument("--depth-ranks", default="2,8", help="ranks at which depths are compared")
    p.add_argument("--sources", default="hidden_state,description", help="task-vector sources (Table 6)")
    p.add_argument("--root", default="artifacts", help="artifacts root (default: artifacts)")


def _zeroshot_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--categories", help="category file or registry folder (default: the library; make corpora)")
    p.add_argument("--only", help="comma-separated category names")
    p.add_argument("--root", default="artifacts", help="artifacts folder (default: artifacts)")
    p.add_argument("--results", default="results/zeroshot", help="results folder (default: results/zeroshot)")


def _registry_scan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--registry", default="categories", help="category file or folder (default: categories)")
    p.add_argument("--root", default="artifacts", help="artifacts folder or fsspec URL (default: artifacts)")
    p.add_argument("--baseline", action="store_true", help="record the registry without emitting events")


def _registry_retrain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--registry", default="categories", help="category file or folder (default: categories)")
    p.add_argument("--root", default="artifacts", help="artifacts folder or fsspec URL (default: artifacts)")
    p.add_argument("--category", help="the category whose change this retrain follows (for the log)")
    p.add_argument("--change", default="added", choices=("added", "changed", "removed"))
    p.add_argument("--baseline", action="store_true", help="record the registry as the scan baseline after")
    p.add_argument(
        "--no-zero-shot",
        action="store_true",
        help="for --change added, skip the selector's adapter published before the retrain (docs/operations.md)",
    )


FLOW_COMMANDS: dict[str, Command] = {
    "pipeline": Command(
        cmd_pipeline,
        "Run the full ICM-LoRA pipeline as a Prefect flow: fine-tune every category, one generator, generated "
        "adapters, baselines, evaluation and the report (a temporary local Prefect server unless PREFECT_API_URL "
        "is set). What `make demo` runs.",
        _pipeline_args,
    ),
    "generate": Command(
        cmd_generate,
        "Generate a PEFT adapter with the trained generator (the latest pipeline run under --root unless "
        "--generator is given), for a category, a task description, a task-vector file, or a new category's "
        "text (--text-dir / --text: no fine-tune needed); prints the adapter folder. Runs as a Prefect flow; "
        "`sample` is the stage alone.",
        _generate_args,
        config=False,
    ),
    "detect": Command(
        cmd_detect, "Run ICM-LoRA on detection tasks (docs/vision.md; needs the vision extra).", _detect_args
    ),
    "ablations": Command(cmd_ablations, "Run the ablations (paper Tables 4-6) as one Prefect flow.", _ablations_args),
    "zeroshot": Command(
        cmd_zeroshot,
        "Run the leave-out protocol (docs/zeroshot.md): K folds over the category library; each fold's generator "
        "and baselines see only the other folds; share of the base-to-oracle gap recovered.",
        _zeroshot_args,
    ),
    "registry scan": Command(
        cmd_registry_scan,
        "Scan the registry once and emit icm.category.* events for the changes.",
        _registry_scan_args,
        config=False,
    ),
    "registry retrain": Command(
        cmd_registry_retrain,
        "Run the pipeline on the whole registry; cached stages of unchanged categories are reused. --baseline "
        "also records the registry as the scan baseline (the first retrain of a new registry), so the next scan "
        "emits only later changes.",
        _registry_retrain_args,
    ),
}
"""The Prefect jobs (each runs a flow)."""

COMMANDS: dict[str, Command] = {**FLOW_COMMANDS, **STAGE_COMMANDS}
"""Every command of ``icm-lora``: the one table the parser is built from."""

GROUPS = {
    "registry": "The category registry (a category file or a folder of them): `scan` compares it with the last "
    "scan and emits icm.category.* events; `retrain` brings the generator up to date with it."
}


def build_parser() -> argparse.ArgumentParser:
    return build_command_parser(COMMANDS, GROUPS)


def main(argv: list[str] | None = None) -> int:
    # The project's warnings reach the run logs in the UI from any folder (prefect.toml covers the repo root).
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "icm_lora")
    return dispatch(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
