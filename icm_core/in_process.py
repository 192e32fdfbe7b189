"""Run every stage of the method in one process, without Prefect.

This is the reference path: the Prefect pipeline calls the same stage functions, each as a cached
task. ``run_in_process`` is used by the CLI's ``run`` command and by the benchmarks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from icm_core import __version__
from icm_core.config import RunConfig
from icm_core.data.categories import Category
from icm_core.data.stages import prepare_data
from icm_core.evaluation.perplexity import gain_recovered
from icm_core.evaluation.stages import evaluate_adapter
from icm_core.generator.stages import compute_task_vector, sample_adapter, train_generator_stage
from icm_core.infra.config import config_fingerprint
from icm_core.infra.layout import stage_dir
from icm_core.lora.stages import finetune_lora
from icm_core.models.base_model import resolve_device


def run_in_process(
    categories: Sequence[Category],
    cfg: RunConfig,
    root: str | Path,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Fine-tune, embed, train the generator, sample and evaluate every category; return the results."""
    root = Path(root)
    names = [c.name for c in categories]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate category names in {names}")
    timings: dict[str, float] = {}
    key = config_fingerprint(cfg, __version__, names)

    def timed(label: str, fn: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        out = fn()
        timings[label] = timings.get(label, 0.0) + time.perf_counter() - started
        return out

    data_dirs, lora_dirs, vector_paths = {}, {}, {}
    for category in categories:
        data_dirs[category.name] = stage_dir(root, "data", key, category.name)
        timed("prepare_data", lambda c=category: prepare_data(c, cfg.data, data_dirs[c.name]))
    for category in categories:
        log(f"[{category.name}] fine-tuning LoRA ({cfg.lora.steps} steps)")
        lora_dirs[category.name] = stage_dir(root, "lora", key, category.name)
        timed(
            "finetune",
            lambda c=category: finetune_lora(data_dirs[c.name], cfg.model, cfg.data, cfg.lora, lora_dirs[c.name]),
        )
    for category in categories:
        log(f"[{category.name}] task vector ({cfg.task_vector.source})")
        vector_paths[category.name] = stage_dir(root, "task_vectors", key, category.name) / "task_vector.safetensors"
        timed(
            "task_vector",
            lambda c=category: compute_task_vector(
                c, data_dirs[c.name], lora_dirs[c.name], cfg.model, cfg.data, cfg.task_vector, vector_paths[c.name]
            ),
        )
    log(f"training one CVAE on {len(categories)} categories ({cfg.cvae.epochs} epochs)")
    generator_path = stage_dir(root, "generator", key) / "generator.safetensors"
    generator_ref = timed(
        "train_generator",
        lambda: train_generator_stage(
            lora_dirs,
            vector_paths,
            cfg.cvae,
            generator_path,
            device=str(resolve_device(cfg.model.device)),
            validation={"split_dirs": data_dirs, "model_cfg": cfg.model, "data_cfg": cfg.data},
        ),
    )
    rows = []
    for category in categories:
        name = category.name
        adapter_dir = stage_dir(root, "adapters", key, name) / "adapter"
        sample_ref = timed("sample", lambda n=name, a=adapter_dir: sample_adapter(generator_path, a, cfg.sample, n))
        scores = {}
        for method, adapter in (
            ("base", None),
            ("lora", Path(lora_dirs[name]) / "adapter"),
            ("icm_lora", adapter_dir),
        ):
            log(f"[{name}] evaluating {method}")
            scores[method] = timed(
                "evaluate",
                lambda a=adapter, n=name: evaluate_adapter(data_dirs[n], a, cfg.model, cfg.data, cfg.eval),
            )
        rows.append(
            {
                "category": name,
                **{f"ppl_{m}": s["ppl"] for m, s in scores.items()},
                **{f"bpc_{m}": s["bpc"] for m, s in scores.items()},
                "gain_recovered": gain_recovered(
                    scores["base"]["ppl"], scores["lora"]["ppl"], scores["icm_lora"]["ppl"]
                ),
                "adapter_dir": str(adapter_dir),
                "generate_seconds": sample_ref["seconds"],
            }
        )
    return {"rows": rows, "generator": generator_ref, "timings": timings, "root": str(root)}
