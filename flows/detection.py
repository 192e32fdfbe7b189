"""The ICM-LoRA pipeline on detection tasks: same stages, same caching, a detector instead of a language model.

    data -> detector LoRA fine-tune -> task vector              (per task, .map)
         -> one CVAE for all tasks -> sample ICM-LoRA adapter    (per task)
         -> baselines: Model Soup, COND P-DIFF                   (the language pipeline's own tasks)
         -> COCOeval mAP50 / mAP75: base / LoRA / Model Soup / COND P-DIFF / ICM-LoRA   (per task, .map)
         -> report (results.csv / results.json / report.md, Prefect table + markdown artifacts)

Default: MTCNN with its pretrained weights on four built-in face tasks (CPU). Any transformers detector
and a COCO file work through ``--set detector.kind=transformers`` and ``data.source=coco``; Florence-2 (the
paper's detector) through ``--set detector.kind=florence2`` (see docs/vision.md). Run with
``icm-lora detect`` or the ``icm-detection/faces`` deployment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, unmapped
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.runtime import confine_deployment_run, thread_task_runner
from flows.steps import baseline_adapters, gather
from icm_core.config import load_run_config
from icm_core.infra.config import config_fingerprint
from icm_core.report.plots import embed_figures
from icm_core.vision.config import DetectionRunConfig, task_slug
from icm_core.vision.stages import source_fingerprint
from tasks.artifacts import ArtifactRef
from tasks.detection import (
    detection_data_task,
    detection_evaluate_task,
    detection_finetune_task,
    detection_task_vector_task,
)
from tasks.generator import sample_adapter_task, train_generator_task
from tasks.report import detection_report_task
from tasks.result_records import on_root
from tasks.store import normalize_root, write_root_json


def load_detection_config(path: str | None = None, overrides: list[str] | None = None) -> DetectionRunConfig:
    """YAML/JSON file with sections data, detector, lora, task_vector, cvae, sample, eval; plus overrides."""
    return load_run_config(path, overrides, DetectionRunConfig)


@flow(name="icm-detection", task_runner=thread_task_runner())
def detection_pipeline(
    config: DetectionRunConfig = DetectionRunConfig(),  # noqa: B008 - pydantic default, shown as a form in the UI
    root: str = "artifacts/detection",
    publish: bool = True,
) -> dict[str, Any]:
    """LoRA per detection task, one ICM-LoRA generator, baselines, and a COCO mAP comparison.

    Args:
        config: All stage configs (data, detector, lora, task_vector, cvae, sample, eval).
        root: Artifacts root: a local folder or an fsspec URL (``s3://...``, ``memory://...``), as for the
            language pipeline; a separate root from the language pipeline's.
        publish: Publish the results table and report as Prefect UI artifacts.
    """
    logger = get_run_logger()
    cfg = config
    # A deployment run reads user COCO files only from the registry folders (the detection tasks' data).
    data_files = {f"config.data.{k}": getattr(cfg.data, k) for k in ("coco_annotations", "coco_images")}
    confine_deployment_run(root, data_files, config=cfg)
    names = [task_slug(t) for t in cfg.data.tasks]
    root = normalize_root(root)
    logger.info(
        "detection tasks: %s; detector %s; artifacts under %s",
        ", ".join(names),
        f"{cfg.detector.kind}:{cfg.detector.name_or_path}",
        root,
    )
    source = source_fingerprint(cfg.data)

    data = gather(
        on_root(detection_data_task, root).map(names, unmapped(source), unmapped(cfg.data), unmapped(root)),
        names,
        "detection-data",
    )
    loras = gather(
        on_root(detection_finetune_task, root).map(
            names, data, unmapped(cfg.detector), unmapped(cfg.lora), unmapped(root), unmapped(cfg.resume)
        ),
        names,
        "detection-finetune-lora",
    )
    needs_lora = cfg.task_vector.source == "hidden_state" and cfg.task_vector.hidden_from == "finetuned"
    vectors = gather(
        on_root(detection_task_vector_task, root).map(
            names,
            data,
            loras if needs_lora else unmapped(None),
            unmapped(cfg.detector),
            unmapped(cfg.task_vector),
            unmapped(root),
        ),
        names,
        "detection-task-vector",
    )
    lora_by_name = dict(zip(names, loras, strict=True))
    vector_by_name = dict(zip(names, vectors, strict=True))
    generator: ArtifactRef = on_root(train_generator_task, root)(
        lora_by_name, vector_by_name, cfg.cvae, cfg.detector.device, root, cfg.resume
    )
    methods = cfg.eval.methods
    by_method: dict[str, list[ArtifactRef | None]] = {"base": [None] * len(names), "lora": list(loras)}
    by_method["icm_lora"] = gather(
        on_root(sample_adapter_task, root).map(names, unmapped(generator), unmapped(cfg.sample), unmapped(root)),
        names,
        "sample",
    )
    baselines = baseline_adapters(methods, names, lora_by_name, vector_by_name, cfg, cfg.detector.device, root)
    by_method.update(baselines.adapters)

    futures, labels = [], []
    for method in methods:
        futures += on_root(detection_evaluate_task, root).map(
            names, unmapped(method), data, by_method[method], unmapped(cfg.detector), unmapped(root)
        )
        labels += [f"{n} ({method})" for n in names]
    scores = gather(futures, labels, "detection-evaluate")
    evals: dict[str, dict[str, ArtifactRef]] = {name: {} for name in names}
    for ref in scores:
        evals[ref.category][ref.meta["method"]] = ref
    run_info = {
        "detector": f"{cfg.detector.kind}:{cfg.detector.name_or_path}",
        "tasks": ", ".join(names),
        "lora": f"r={cfg.lora.rank} alpha={cfg.lora.alpha} on {', '.join(cfg.lora.target_modules)}; "
        f"{cfg.lora.steps} steps, last {cfg.lora.trajectory_size} checkpoints kept",
        "task_vector": cfg.task_vector.source,
        "cvae": f"{len(cfg.cvae.channels)} layers, latent {cfg.cvae.latent_dim}, {cfg.cvae.epochs} epochs",
        "config_fingerprint": config_fingerprint(cfg)[:16],
    }
    report = on_root(detection_report_task, root)(
        evals, lora_by_name, generator, run_info, root, data=dict(zip(names, data, strict=True))
    )
    rows = report.meta["rows"]
    if publish:
        create_table_artifact(
            key="icm-detection-summary", table=rows, description="mAP50 / mAP75 per detection task and method"
        )
        create_markdown_artifact(
            key="icm-detection-report",
            markdown=embed_figures(Path(report.file("report.md")).read_text(), Path(report.folder)),
            description="ICM-LoRA detection report (figure embedded)",
        )
    summary = {
        "rows": rows,
        "report_dir": str(report.folder),
        "report": str(report.file("report.md")),
        "generator": str(generator.file("generator.safetensors")),
    }
    write_root_json(root, "latest.json", summary)
    return summary
