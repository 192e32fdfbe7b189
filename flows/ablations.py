"""The ablation flow: the paper's Tables 4-6 reproduced on our categories with one command.

    icm-lora ablations                             # defaults below, CPU-sized
    make ablations                                 # the same

Each variant is a run of the pipeline flow (a subflow, cached like every run), so variants share every
stage they have in common: the depth and task-vector variants reuse the rank-2 fine-tunes, a rerun is all
cache hits, and a killed ablation resumes. Each variant records its results in its own pointer file,
``<root>/ablations/<variant>.json``, never in ``latest.json`` (which stays the last plain pipeline run's, the
one ``generate_adapter`` uses by default); the ablation report's pointer is ``<root>/latest-ablations.json``.
The root may be a local folder or an fsspec URL, as for the pipeline. Variants:

* rank (Table 4): ``lora.rank`` in ``ranks``; one generator per rank; all methods (Model Soup, COND P-DIFF,
  ICM-LoRA), with storage per rank;
* depth (Table 5): the CVAE with ``depths`` conv layers, at each of ``depth_ranks``; ICM-LoRA only;
* source (Table 6): task vectors from ``sources`` (``hidden_state``: Eq. 1; ``description``: the sentence
  encoder's embedding of the category description, our stand-in for the paper's CLIP text encoder); ICM-LoRA only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prefect import flow, get_run_logger

from flows.pipeline import icm_pipeline
from flows.runtime import confine_deployment_run, thread_task_runner
from icm_core.config import RunConfig
from icm_core.generator.config import OFFICIAL_CHANNELS
from icm_core.infra.config import config_fingerprint
from icm_core.report.pipeline import root_relative
from tasks.report import ablation_report_task, publish_ablations
from tasks.result_records import on_root
from tasks.store import normalize_root, write_root_json


DEFAULT_CATEGORIES = ("news", "python-docs")
"""Two categories, as the paper's ablations use two (dog and cat): the ablations cost ~4 pipeline runs."""


def channel_plan(depth: int) -> tuple[int, ...]:
    """The official channel plan shortened to ``depth`` layers: the first half of its up-ramp and the last half
    of its down-ramp (4 -> 8, 16, 16, 8; 8 -> 8, 16, 32, 64, 64, 32, 16, 8; 12 -> the official plan)."""
    if not 2 <= depth <= 2 * len(OFFICIAL_CHANNELS):
        raise ValueError(f"depths: {depth} is outside 2..{2 * len(OFFICIAL_CHANNELS)}")
    if depth == len(OFFICIAL_CHANNELS):
        return OFFICIAL_CHANNELS
    half = len(OFFICIAL_CHANNELS) // 2
    up, down = OFFICIAL_CHANNELS[:half], OFFICIAL_CHANNELS[half:]
    first, second = (depth + 1) // 2, depth // 2
    if first > half:  # deeper than the official plan: repeat its widest layer in the middle
        return (*up, *[up[-1]] * (depth - 2 * half), *down)
    return (*up[:first], *down[half - second :])


@dataclass(frozen=True)
class Variant:
    group: str
    name: str
    params: dict[str, Any]
    config: RunConfig


def ablation_variants(
    base: RunConfig, ranks: list[int], depths: list[int], depth_ranks: list[int], sources: list[str]
) -> list[Variant]:
    """The variant configs, without duplicates (a depth-12 variant is the rank variant's own run)."""
    icm_only = ("base", "lora", "icm_lora")
    variants = []

    def with_(config: RunConfig, methods: tuple[str, ...] | None = None, **sections: dict[str, Any]) -> RunConfig:
        """A validated copy (model_copy would skip validation: a rank of 0 must fail here, not mid-run)."""
        tree = config.model_dump(mode="json")
        for section, values in sections.items():
            tree[section].update(values)
        if methods is not None:
            tree["methods"] = list(methods)
        return RunConfig.model_validate(tree)

    for rank in ranks:
        cfg = with_(base, lora={"rank": rank})
        variants.append(Variant("rank", f"rank-{rank}", {"rank": rank}, cfg))
    for rank in depth_ranks:
        for depth in depths:
            cfg = with_(base, icm_only, lora={"rank": rank}, cvae={"channels": list(channel_plan(depth))})
            variants.append(Variant("depth", f"depth-{depth}-rank-{rank}", {"conv layers": depth, "rank": rank}, cfg))
    for source in sources:
        cfg = with_(base, icm_only, task_vector={"source": source})
        variants.append(Variant("source", f"source-{source}", {"task vector": source}, cfg))
    return variants


@flow(name="icm-ablations", task_runner=thread_task_runner(), log_prints=True)
def icm_ablations(
    config: RunConfig = RunConfig(),  # noqa: B008 - pydantic default, shown as a form in the UI
    categories_file: str | None = None,
    only: list[str] | None = list(DEFAULT_CATEGORIES),  # noqa: B006 - a parameter default, never mutated
    ranks: list[int] = [1, 2, 4, 8],  # noqa: B006
    depths: list[int] = [4, 8, 12],  # noqa: B006
    depth_ranks: list[int] = [2, 8],  # noqa: B006
    sources: list[str] = ["hidden_state", "description"],  # noqa: B006
    root: str = "artifacts",
) -> dict[str, Any]:
    """Run the ablation variants as pipeline subflows and write the ablation tables and figure.

    Args:
        config: The base run config every variant starts from (default: the CPU demo).
        categories_file: Category file; default: the built-in demo categories.
        only: Categories to use (default: news and python-docs); None uses all.
        ranks: LoRA ranks of the rank ablation (Table 4).
        depths: CVAE conv-layer counts of the depth ablation (Table 5).
        depth_ranks: LoRA ranks at which the depths are compared.
        sources: Task-vector sources of Table 6.
        root: Artifacts root: a local folder or an fsspec URL.
    """
    logger = get_run_logger()
    confine_deployment_run(root, {"categories_file": categories_file}, config=config)
    root = normalize_root(root)
    # The ablation tables compare scored adapters; the z-draw diagnostics (extra draws, scored) are left out.
    config = config.model_copy(update={"diagnostics": config.diagnostics.model_copy(update={"z_draws": 1})})
    variants = ablation_variants(config, ranks, depths, depth_ranks, sources)
    done: dict[str, dict[str, Any]] = {}
    results = []
    for variant in variants:
        fingerprint = config_fingerprint(variant.config)
        if fingerprint not in done:
            logger.info("ablation variant %s", variant.name)
            run = icm_pipeline.with_options(flow_run_name=f"ablation-{variant.name}")
            done[fingerprint] = run(
                config=variant.config,
                categories_file=categories_file,
                only=only,
                root=root,
                publish=False,
                pointer=f"ablations/{variant.name}.json",
            )
        summary = done[fingerprint]
        results.append(
            {
                "group": variant.group,
                "name": variant.name,
                "params": variant.params,
                "rows": [{k: v for k, v in r.items() if k != "adapter_dir"} for r in summary["rows"]],
                "storage": summary["storage"],
                "flat_length": summary["generator_meta"]["flat_length"],
                # Relative to the artifacts root: the ablation files carry no absolute path of this machine.
                "report": root_relative(summary["report"], root),
            }
        )
    report = on_root(ablation_report_task, root)(results, root)
    publish_ablations(report)
    out = {"report": str(report.file("ablations.md")), "summary": report.meta["summary"]}
    write_root_json(root, "latest-ablations.json", out)
    return out
