"""Prefect tasks: thin wrappers around ``icm_core.stages`` with cache keys, retries and references.

Each task (1) derives its key from its inputs exactly as :class:`ArtifactCachePolicy` does, (2) reuses
the output folder when its manifest is valid (this also resumes work a killed run finished but
could not record), otherwise (3) runs the ``icm_core`` stage into the folder and writes the manifest
last. Heavy stages hold a per-device slot so a process never runs two of them on one device at once.

The long stages (LoRA fine-tuning, the CVAE, COND P-DIFF) also save resumable state while they train,
in ``.<key>.resume/`` next to their output folder (:func:`resume_dir`); a killed run's successor continues
from it ("resuming from step k" in the log) and the state is removed once the output's manifest is written.
How often is ``RunConfig.resume``, which the tasks take as ``resume`` and leave out of the cache key.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from prefect import get_run_logger, task
from prefect.concurrency.sync import concurrency
from prefect.exceptions import MissingContextError

from icm_core.baselines.config import PDiffConfig, SoupConfig
from icm_core.baselines.stages import sample_pdiff_states, soup_adapter, train_pdiff_stage, write_sampled_adapter
from icm_core.data.categories import Category
from icm_core.data.config import DataConfig
from icm_core.data.stages import prepare_data
from icm_core.evaluation.config import EvalConfig
from icm_core.evaluation.stages import evaluate_adapter, generator_diagnostics
from icm_core.generator.config import CVAEConfig, SampleConfig, TaskVectorConfig
from icm_core.generator.stages import compute_task_vector, sample_adapter, train_generator_stage
from icm_core.infra.config import ResumeConfig
from icm_core.infra.faults import fault_point
from icm_core.infra.io import ArtifactError
from icm_core.infra.resume import Resumer
from icm_core.lora.config import LoraTrainConfig
from icm_core.lora.stages import finetune_lora, trajectory_mean_adapter
from icm_core.models.base_model import parse_device, resolve_device
from icm_core.models.config import ModelConfig
from icm_core.models.identity import ModelLoadError
from tasks.artifacts import (
    ArtifactCachePolicy,
    ArtifactRef,
    localize,
    output_dir,
    output_lock,
    ref_for,
    reset_folder,
    stage_key,
    valid_output,
    write_manifest,
)
from tasks.progress import Progress
from tasks.store import fetch, is_remote, publish, remote_manifest


_device_locks: dict[str, threading.Lock] = {}
_device_locks_guard = threading.Lock()


GPU_LIMIT_ENV = "ICM_GPU_LIMIT"
"""Name template of the Prefect global concurrency limit per GPU (``{host}``, ``{index}``: the physical GPU
index, after CUDA_VISIBLE_DEVICES); ``off`` disables it. Default ``gpu-{host}-{index}``."""


def gpu_limit_name(device: torch.device) -> str | None:
    """The global concurrency limit that guards ``device`` across processes, or None (CPU, or disabled)."""
    template = os.environ.get(GPU_LIMIT_ENV, "gpu-{host}-{index}").strip()
    if device.type != "cuda" or template in ("", "off"):
        return None
    index = device.index or 0
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    physical = visible[index] if index < len(visible) else str(index)
    return template.format(host=socket.gethostname().split(".")[0], index=physical)


@contextmanager
def device_slot(device: str):
    """One heavy stage per device at a time: fanned-out tasks queue here instead of oversubscribing it.

    Within a process a lock per device does it. A GPU is also guarded across processes and machines (Dask
    or Ray workers, several Prefect workers on one host) by a Prefect global concurrency limit named
    :func:`gpu_limit_name` (create it with ``prefect gcl create gpu-<host>-<index> --limit 1``; while it
    does not exist Prefect only warns and the per-process lock is the only guard).
    """
    resolved = parse_device(device)  # the name only: the stage itself refuses a device the machine lacks
    with _device_locks_guard:
        lock = _device_locks.setdefault(str(resolved), threading.Lock())
    limit = gpu_limit_name(resolved)
    with lock:
        if limit is None:
            yield
            return
        with concurrency(limit, occupy=1, strict=False):
            yield


def _log():
    """The Prefect run logger inside a run, the module logger outside one."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("icm_lora.tasks")


def resume_dir(folder: Path) -> Path:
    """Where a stage building ``folder`` keeps its resumable state: a hidden sibling, so resetting the output
    folder keeps it, and readers of outputs never see it."""
    return folder.with_name(f".{folder.name}.resume")


def resumer(folder: Path, **every: int) -> Resumer:
    return Resumer(resume_dir(folder), every)


def run_stage(
    stage: str,
    category: str | None,
    inputs: dict[str, Any],
    build: Callable[[Path], dict[str, Any]],
) -> ArtifactRef:
    """Reuse a valid output folder for these inputs, or build it and write its manifest.

    Building holds the folder's lock: a concurrent run with the same inputs waits, then finds the
    finished folder and reuses it instead of training again. A build that finds resumable state (left by a
    killed run, :func:`resume_dir`) logs where it resumes from; the state is removed once the manifest is
    written.
    """
    root = inputs["root"]
    key = stage_key(stage, inputs)
    folder = output_dir(root, stage, key, category)
    manifest = valid_output(folder)
    if manifest is None:
        with output_lock(root, folder):
            manifest = valid_output(folder)  # another run may have finished it while we waited
            if manifest is None and is_remote(root) and _fetch_published(root, folder):
                manifest = valid_output(folder)
                _log().info("%s: fetched published artifact %s from %s", stage, folder.name, root)
                return ref_for(stage, category, key, folder, manifest)
            if manifest is None:
                reset_folder(folder)
                fault_point("stage.before_build", folder)
                point = Resumer(resume_dir(folder)).latest_label()
                if point is not None:
                    _log().info("%s: resuming from %s (state in %s)", stage, point, resume_dir(folder))
                meta = build(folder)
                fault_point("stage.before_manifest", folder)
                write_manifest(folder, meta)
                manifest = valid_output(folder, full=False)
                if manifest is None:  # pragma: no cover - only if the disk changed under us
                    raise RuntimeError(f"{folder}: output failed verification right after writing")
                Resumer(resume_dir(folder)).clear()
                fault_point("stage.after_manifest", folder)
                if is_remote(root):
                    publish(root, folder, manifest)
                return ref_for(stage, category, key, folder, manifest)
    fault_point("stage.reuse", folder)
    if is_remote(root) and remote_manifest(root, folder) is None:
        publish(root, folder, manifest)  # built here before the remote copy was lost (or never published)
    _log().info("%s: reusing complete artifact %s", stage, folder)
    return ref_for(stage, category, key, folder, manifest)


def _fetch_published(root: str, folder: Path) -> bool:
    """Fetch a published output; a corrupted remote copy is logged and rebuilt (then republished)."""
    try:
        return fetch(root, folder)
    except ArtifactError as exc:
        _log().warning("rebuilding: %s", exc)
        return False


TASK_DEFAULTS: dict[str, Any] = {"persist_result": True, "result_serializer": "json"}

BAD_INPUT_ERRORS = (ValueError, ModelLoadError, ArtifactError, FloatingPointError)
"""Failures that a retry would only repeat later: bad input, a broken artifact, a diverged run."""


def retry_unless_bad_input(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry transient failures (I/O, out of memory), not bad input."""
    return not isinstance(state.data, BAD_INPUT_ERRORS)


@task(
    name="prepare-data",
    task_run_name="data-{category.name}",
    cache_policy=ArtifactCachePolicy("data"),
    **TASK_DEFAULTS,
)
def prepare_data_task(category: Category, source_sha256: str, data_cfg: DataConfig, root: str) -> ArtifactRef:
    """Split a category's text into train / val / test."""
    inputs = {"category": category, "source_sha256": source_sha256, "data_cfg": data_cfg, "root": root}
    return run_stage(
        "data", category.name, inputs, lambda out: prepare_data(category, data_cfg, out / "splits")
    )


@task(
    name="finetune-lora",
    task_run_name="lora-{category}",
    cache_policy=ArtifactCachePolicy("lora", exclude=("resume",)),
    retries=1,
    retry_condition_fn=retry_unless_bad_input,
    retry_delay_seconds=5,
    **TASK_DEFAULTS,
)
def finetune_task(
    category: str,
    data: ArtifactRef,
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
    lora_cfg: LoraTrainConfig,
    root: str,
    resume: ResumeConfig = ResumeConfig(),  # noqa: B008 - frozen config; not part of the cache key
) -> ArtifactRef:
    """Fine-tune the category's LoRA adapter and keep its trajectory (resumable mid-way, ``resume``)."""
    logger = get_run_logger()
    inputs = {
        "category": category,
        "data": data,
        "model_cfg": model_cfg,
        "data_cfg": data_cfg,
        "lora_cfg": lora_cfg,
        "root": root,
    }

    progress: list[Progress] = []

    def on_step(step: int, loss: float) -> None:
        if not progress:  # created on the first step: a cache hit shows no bar
            progress.append(Progress(f"fine-tune lora-{category} (steps)", lora_cfg.steps))
        progress[0].update(step)
        if step % 10 == 0 or step == lora_cfg.steps:
            logger.info("lora-%s step %d/%d loss %.4f", category, step, lora_cfg.steps, loss)

    def build(out: Path) -> dict[str, Any]:
        with device_slot(model_cfg.device):
            splits = localize(data, root).file("splits")
            result = finetune_lora(
                splits,
                model_cfg,
                data_cfg,
                lora_cfg,
                out,
                on_step=on_step,
                resume=resumer(out, steps=resume.lora_every_steps),
            )
        return {k: result[k] for k in ("checkpoints", "final_loss", "train_blocks", "seconds", "adapter_sha256")}

    return run_stage("lora", category, inputs, build)


@task(
    name="task-vector",
    task_run_name="task-vector-{category.name}",
    cache_policy=ArtifactCachePolicy("task_vectors"),
    retries=1,
    retry_condition_fn=retry_unless_bad_input,
    **TASK_DEFAULTS,
)
def task_vector_task(
    category: Category,
    data: ArtifactRef,
    lora: ArtifactRef | None,
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
    tv_cfg: TaskVectorConfig,
    root: str,
) -> ArtifactRef:
    """Compute the category's task vector (Eq. 1, or its description embedding)."""
    inputs = {
        "category": category,
        "data": data,
        "lora": lora,
        "model_cfg": model_cfg,
        "data_cfg": data_cfg,
        "tv_cfg": tv_cfg,
        "root": root,
    }

    def build(out: Path) -> dict[str, Any]:
        splits, lora_dir = localize(data, root).file("splits"), lora and localize(lora, root).folder
        with device_slot(model_cfg.device):
            result = compute_task_vector(
                category,
                splits,
                lora_dir,
                model_cfg,
                data_cfg,
                tv_cfg,
                out / "task_vector.safetensors",
            )
        return {"dim": result["dim"], "kind": result["kind"]}

    return run_stage("task_vectors", category.name, inputs, build)


@task(
    name="train-generator",
    task_run_name="train-cvae",
    cache_policy=ArtifactCachePolicy("generator", category_arg=None, exclude=("resume",)),
    retries=1,
    retry_condition_fn=retry_unless_bad_input,
    **TASK_DEFAULTS,
)
def train_generator_task(
    loras: dict[str, ArtifactRef],
    task_vectors: dict[str, ArtifactRef],
    cvae_cfg: CVAEConfig,
    device: str,
    root: str,
    resume: ResumeConfig = ResumeConfig(),  # noqa: B008 - frozen config; not part of the cache key
    data: dict[str, ArtifactRef] | None = None,
    model_cfg: ModelConfig | None = None,
    data_cfg: DataConfig | None = None,
) -> ArtifactRef:
    """Train one CVAE on the trajectories of all categories (resumable mid-way, ``resume``). With ``data`` (the
    categories' splits), ``model_cfg`` and ``data_cfg``, training stops early on the generated adapters'
    validation NLL (``cvae_cfg.val_every``, ``patience``); without them it runs ``cvae_cfg.epochs``."""
    logger = get_run_logger()
    # Every parameter but ``resume`` is in the key (the cache policy sees the same inputs).
    inputs = {
        "loras": loras,
        "task_vectors": task_vectors,
        "cvae_cfg": cvae_cfg,
        "device": device,
        "root": root,
        "data": data,
        "model_cfg": model_cfg,
        "data_cfg": data_cfg,
    }
    validated = data is not None and model_cfg is not None and data_cfg is not None and cvae_cfg.val_every > 0

    progress: list[Progress] = []

    def on_epoch(epoch: int, row: dict) -> None:
        epoch += 1  # train_cvae counts epochs from 0
        if not progress:
            progress.append(Progress("train the ICM-LoRA CVAE (epochs)", cvae_cfg.epochs))
        progress[0].update(epoch)
        if "val" in row:
            what = "worst unrecovered gap" if cvae_cfg.val_criterion == "worst_gap" else "mean NLL"
            logger.info(
                "cvae epoch %d/%d recon %.5f kld %.3f validation %s %.4f",
                epoch,
                cvae_cfg.epochs,
                row["recon"],
                row["kld"],
                what,
                row["val"],
            )
        elif epoch % max(1, cvae_cfg.epochs // 10) == 0 or epoch == cvae_cfg.epochs:
            logger.info("cvae epoch %d/%d recon %.5f kld %.3f", epoch, cvae_cfg.epochs, row["recon"], row["kld"])

    def build(out: Path) -> dict[str, Any]:
        lora_dirs = {name: localize(ref, root).folder for name, ref in loras.items()}
        vector_files = {n: localize(ref, root).file("task_vector.safetensors") for n, ref in task_vectors.items()}
        validation = None
        if validated:
            validation = {
                "split_dirs": {name: localize(ref, root).file("splits") for name, ref in data.items()},
                "model_cfg": model_cfg,
                "data_cfg": data_cfg,
            }
        with device_slot(device):
            result = train_generator_stage(
                lora_dirs,
                vector_files,
                cvae_cfg,
                out / "generator.safetensors",
                device=str(resolve_device(device)),
                on_epoch=on_epoch,
                resume=resumer(out, epochs=resume.cvae_every_epochs),
                validation=validation,
            )
        keys = ("bytes", "num_checkpoints", "flat_length", "final_recon", "epochs_run", "best_epoch", "seconds")
        return {k: result[k] for k in keys}

    return run_stage("generator", None, inputs, build)


@task(
    name="sample-adapter",
    task_run_name="sample-{category}",
    cache_policy=ArtifactCachePolicy("adapters"),
    **TASK_DEFAULTS,
)
def sample_adapter_task(category: str, generator: ArtifactRef, sample_cfg: SampleConfig, root: str) -> ArtifactRef:
    """Generate the category's adapter from the generator (no real checkpoint involved)."""
    inputs = {"category": category, "generator": generator, "sample_cfg": sample_cfg, "root": root}

    def build(out: Path) -> dict[str, Any]:
        generator_file = localize(generator, root).file("generator.safetensors")
        result = sample_adapter(generator_file, out / "adapter", sample_cfg, category)
        return {"seconds": result["seconds"], "adapter_sha256": result["adapter_sha256"]}

    return run_stage("adapters", category, inputs, build)


@task(
    name="model-soup",
    task_run_name="soup-{label}",
    cache_policy=ArtifactCachePolicy("soup", category_arg="label"),
    **TASK_DEFAULTS,
)
def soup_task(label: str, loras: dict[str, ArtifactRef], soup_cfg: SoupConfig, root: str) -> ArtifactRef:
    """Model Soup baseline: average adapters as weight deltas into one PEFT adapter.

    ``label`` names the soup: ``"all"`` for the soup of every category's final adapter, or a category for
    the soup of its own trajectory (``soup.scope='trajectory'``).
    """
    inputs = {"label": label, "loras": loras, "soup_cfg": soup_cfg, "root": root}

    def build(out: Path) -> dict[str, Any]:
        lora_dirs = {name: localize(ref, root).folder for name, ref in loras.items()}
        result = soup_adapter(lora_dirs, soup_cfg, out / "adapter")
        return {k: result[k] for k in ("adapter_sha256", "rank", "sources")}

    return run_stage("soup", label, inputs, build)


@task(
    name="train-cond-pdiff",
    task_run_name="train-cond-pdiff",
    cache_policy=ArtifactCachePolicy("pdiff", category_arg=None, exclude=("resume",)),
    retries=1,
    retry_condition_fn=retry_unless_bad_input,
    **TASK_DEFAULTS,
)
def train_pdiff_task(
    loras: dict[str, ArtifactRef],
    task_vectors: dict[str, ArtifactRef],
    pdiff_cfg: PDiffConfig,
    device: str,
    root: str,
    resume: ResumeConfig = ResumeConfig(),  # noqa: B008 - frozen config; not part of the cache key
) -> ArtifactRef:
    """COND P-DIFF baseline: autoencoder + conditional latent DDPM on the same trajectories and task vectors
    (resumable mid-way, ``resume``)."""
    logger = get_run_logger()
    inputs = {"loras": loras, "task_vectors": task_vectors, "pdiff_cfg": pdiff_cfg, "device": device, "root": root}

    bars: dict[str, Progress] = {}
    totals = {"autoencoder": pdiff_cfg.ae_epochs, "ddpm": pdiff_cfg.ddpm_steps}

    def on_progress(phase: str, step: int, loss: float) -> None:
        if phase in totals:
            if phase not in bars:
                bars[phase] = Progress(f"COND P-DIFF {phase}", totals[phase])
            bars[phase].update(step + 1 if phase == "autoencoder" else step)
        if phase == "autoencoder":
            step += 1
            if step % max(1, pdiff_cfg.ae_epochs // 5) == 0 or step == pdiff_cfg.ae_epochs:
                logger.info("cond-pdiff autoencoder epoch %d/%d recon %.5f", step, pdiff_cfg.ae_epochs, loss)
        elif step % max(1, pdiff_cfg.ddpm_steps // 5) < pdiff_cfg.log_every or step == pdiff_cfg.ddpm_steps:
            logger.info("cond-pdiff ddpm step %d/%d loss %.5f", step, pdiff_cfg.ddpm_steps, loss)

    def build(out: Path) -> dict[str, Any]:
        lora_dirs = {name: localize(ref, root).folder for name, ref in loras.items()}
        vector_files = {n: localize(ref, root).file("task_vector.safetensors") for n, ref in task_vectors.items()}
        with device_slot(device):
            result = train_pdiff_stage(
                lora_dirs,
                vector_files,
                pdiff_cfg,
                out / "pdiff.safetensors",
                device=str(resolve_device(device)),
                on_progress=on_progress,
                resume=resumer(out, ae_epochs=resume.pdiff_every_epochs, ddpm_steps=resume.pdiff_every_steps),
            )
        keys = ("bytes", "num_checkpoints", "flat_length", "final_ae_recon", "final_ddpm_loss", "seconds")
        return {k: result[k] for k in keys}

    return run_stage("pdiff", None, inputs, build)


@task(
    name="sample-cond-pdiff",
    task_run_name="sample-pdiff",
    cache_policy=ArtifactCachePolicy("pdiff_adapters", category_arg=None, fan_out=("categories", "category")),
    **TASK_DEFAULTS,
)
def sample_pdiff_task(
    categories: list[str], pdiff: ArtifactRef, sample_cfg: SampleConfig, root: str
) -> list[ArtifactRef]:
    """Generate the categories' adapters with COND P-DIFF, in order, denoised together in one batch (the 1000
    steps are paid once, not once per category). Each category has its own output folder, keyed by the
    batch's inputs plus its name; a lost folder is rebuilt by sampling the same batch again, so the rebuilt
    adapter is bit-identical to the lost one (batched float rounding depends on the batch)."""
    inputs = {"categories": categories, "pdiff": pdiff, "sample_cfg": sample_cfg, "root": root}
    sampled: dict[str, Any] = {}

    def build_for(name: str) -> Callable[[Path], dict[str, Any]]:
        def build(out: Path) -> dict[str, Any]:
            if not sampled:
                pdiff_file = localize(pdiff, root).file("pdiff.safetensors")
                states, adapter_config, seconds = sample_pdiff_states(pdiff_file, sample_cfg, categories)
                sampled.update(states=states, config=adapter_config, seconds=seconds)
            digest = write_sampled_adapter(out / "adapter", sampled["states"][name], sampled["config"])
            return {"seconds": sampled["seconds"], "batch_categories": len(categories), "adapter_sha256": digest}

        return build

    return [run_stage("pdiff_adapters", n, {**inputs, "category": n}, build_for(n)) for n in categories]


def evaluation_inputs(
    data: ArtifactRef, adapter: ArtifactRef | None, prefix_like: ArtifactRef | None, root: str
) -> tuple[Path, Path | None, Path | None]:
    """This machine's paths for one evaluation: the category's splits, the adapter folder (None: the base model)
    and, for the base model only, the adapter whose first layer its shared-prefix pass starts at."""
    adapter_dir = localize(adapter, root).file("adapter") if adapter is not None else None
    like = localize(prefix_like, root).file("adapter") if adapter is None and prefix_like is not None else None
    return localize(data, root).file("splits"), adapter_dir, like


@task(
    name="evaluate",
    task_run_name="eval-{category}-{method}",
    cache_policy=ArtifactCachePolicy("eval", exclude=("prefix_like",)),
    retries=1,
    retry_condition_fn=retry_unless_bad_input,
    **TASK_DEFAULTS,
)
def evaluate_task(
    category: str,
    method: str,
    data: ArtifactRef,
    adapter: ArtifactRef | None,
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
    eval_cfg: EvalConfig,
    root: str,
    prefix_like: ArtifactRef | None = None,
) -> ArtifactRef:
    """PPL / BPC of the base model merged with ``adapter`` (None: the base model) on the test split.

    ``prefix_like`` (for the base model): an adapter whose first adapted layer the base evaluation starts the
    shared prefix at, so the adapters scored after it on the same blocks run only their own layers. It does not
    change any number, so it is not part of the cache key."""
    inputs = {
        "category": category,
        "method": method,
        "data": data,
        "adapter": adapter,
        "model_cfg": model_cfg,
        "data_cfg": data_cfg,
        "eval_cfg": eval_cfg,
        "root": root,
    }

    def build(out: Path) -> dict[str, Any]:
        splits, adapter_dir, like = evaluation_inputs(data, adapter, prefix_like, root)
        with device_slot(model_cfg.device):
            score = evaluate_adapter(
                splits, adapter_dir, model_cfg, data_cfg, eval_cfg, out / "metrics.json", prefix_like=like
            )
        keys = ("ppl", "bpc", "tokens", "chars", "nll_nats", "block_nll", "block_tokens", "block_chars")
        return {"method": method, **{k: score[k] for k in (*keys, "blocks_available", "seconds")}}

    return run_stage("eval", category, inputs, build)


@task(
    name="trajectory-mean",
    task_run_name="trajectory-mean-{category}",
    cache_policy=ArtifactCachePolicy("trajectory_mean"),
    **TASK_DEFAULTS,
)
def trajectory_mean_task(category: str, lora: ArtifactRef, root: str) -> ArtifactRef:
    """Reference point: the coordinate-wise mean of the category's own trajectory checkpoints, as an adapter."""
    inputs = {"category": category, "lora": lora, "root": root}

    def build(out: Path) -> dict[str, Any]:
        result = trajectory_mean_adapter(localize(lora, root).folder, out / "adapter")
        return {k: result[k] for k in ("adapter_sha256", "sources")}

    return run_stage("trajectory_mean", category, inputs, build)


@task(
    name="generator-diagnostics",
    task_run_name="diagnostics-{label}",
    cache_policy=ArtifactCachePolicy("diagnostics", category_arg="label"),
    **TASK_DEFAULTS,
)
def diagnostics_task(
    label: str,
    draws: dict[str, list[ArtifactRef]],
    loras: dict[str, ArtifactRef],
    root: str,
    generator: ArtifactRef | None = None,
    task_vectors: dict[str, ArtifactRef] | None = None,
) -> ArtifactRef:
    """Distances to training checkpoints, z-draw spread (and, for the CVAE, latent usage) of one generator."""
    inputs = {
        "label": label,
        "draws": draws,
        "loras": loras,
        "root": root,
        "generator": generator,
        "task_vectors": task_vectors,
    }

    def build(out: Path) -> dict[str, Any]:
        draw_dirs = {n: [localize(r, root).file("adapter") for r in refs] for n, refs in draws.items()}
        lora_dirs = {name: localize(ref, root).folder for name, ref in loras.items()}
        gen_file = localize(generator, root).file("generator.safetensors") if generator is not None else None
        vector_files = (
            {n: localize(r, root).file("task_vector.safetensors") for n, r in task_vectors.items()}
            if task_vectors
            else None
        )
        return generator_diagnostics(draw_dirs, lora_dirs, out / "diagnostics.json", gen_file, vector_files)

    return run_stage("diagnostics", label, inputs, build)
