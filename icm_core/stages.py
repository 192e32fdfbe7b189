"""The method's stages as functions over artifact folders: what the CLI and the Prefect tasks call.

Each stage reads its inputs from files, writes its outputs atomically under ``out``, and returns a
small JSON-ready reference (paths, sha256, metrics). Nothing here imports Prefect.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from icm_core.adapters import (
    adapter_first_layer,
    adapter_sha256,
    first_adapted_layer,
    load_adapter,
    merged_into,
    merged_state_into,
    read_adapter,
    write_adapter,
)
from icm_core.base_model import (
    adapter_base_reference,
    base_model_names,
    load_base_model,
    load_tokenizer,
    shared_base_model,
)
from icm_core.baselines import model_soup
from icm_core.config import (
    CVAEConfig,
    DataConfig,
    EvalConfig,
    LoraTrainConfig,
    ModelConfig,
    PDiffConfig,
    SampleConfig,
    SoupConfig,
    TaskVectorConfig,
)
from icm_core.data import (
    Category,
    read_documents,
    read_splits,
    sample_blocks,
    split_documents,
    token_blocks,
    write_splits,
)
from icm_core.diagnostics import adapter_report, latent_usage
from icm_core.evaluate import eval_blocks, evaluate_lm, score_blocks
from icm_core.generator import GeneratorDataset, build_dataset, load_generator, save_generator, train_generator
from icm_core.io import load_tensors, read_json, save_tensors, sidecar_path, write_json
from icm_core.lora_train import load_trajectory_checkpoints, read_trajectory, train_lora
from icm_core.pdiff import load_pdiff, save_pdiff, train_pdiff
from icm_core.resume import Resumer
from icm_core.task_vectors import (
    TaskVectorKindError,
    TextEncoder,
    hidden_state_task_vector,
    task_vector_kind,
    text_task_vector,
)


def prepare_data(category: Category, data_cfg: DataConfig, out: str | Path) -> dict[str, Any]:
    """Read a category's documents and write deterministic train/val/test splits to ``out``."""
    splits = split_documents(read_documents(category, data_cfg), data_cfg)
    summary = write_splits(splits, out)
    return {"category": category.name, "folder": str(out), **summary}


def finetune_lora(
    data_dir: str | Path,
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
    lora_cfg: LoraTrainConfig,
    out: str | Path,
    on_step=None,
    resume: Resumer | None = None,
) -> dict[str, Any]:
    """Fine-tune a LoRA adapter on a category's train split; save its trajectory and final adapter
    (``resume``: where to save resumable state and continue from, ``icm_core.resume``)."""
    tokenizer = load_tokenizer(model_cfg)
    blocks = token_blocks(read_splits(data_dir).train, tokenizer, data_cfg.seq_len)
    base = load_base_model(model_cfg)
    started = time.perf_counter()
    trajectory = train_lora(
        base, blocks, lora_cfg, out, adapter_base_reference(model_cfg), on_step=on_step, resume=resume
    )
    return {
        "folder": str(out),
        "adapter_dir": str(trajectory.adapter_dir),
        "adapter_sha256": adapter_sha256(trajectory.adapter_dir),
        "checkpoints": trajectory.files,
        "final_loss": trajectory.losses[-1],
        "train_blocks": int(blocks.shape[0]),
        "seconds": time.perf_counter() - started,
    }


def compute_task_vector(
    category: Category,
    data_dir: str | Path,
    trajectory_dir: str | Path | None,
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
    tv_cfg: TaskVectorConfig,
    out_path: str | Path,
) -> dict[str, Any]:
    """Compute a category's task vector (Eq. 1 on train samples, or its description embedding); the sidecar
    records the vector's kind (:func:`~icm_core.task_vectors.task_vector_kind`)."""
    kind = task_vector_kind(tv_cfg, model_cfg.name_or_path)
    if tv_cfg.source == "description":
        encoder = TextEncoder(tv_cfg.text_encoder, trust_remote_code=tv_cfg.text_encoder_trust_remote_code)
        vector = text_task_vector(category.description, encoder)
    else:
        tokenizer = load_tokenizer(model_cfg)
        # Samples come from the train split only: test text never shapes the condition.
        blocks = token_blocks(read_splits(data_dir).train, tokenizer, tv_cfg.sample_tokens)
        blocks = sample_blocks(blocks, tv_cfg.num_samples, tv_cfg.seed)
        model = load_base_model(model_cfg)
        if tv_cfg.hidden_from == "finetuned":
            if trajectory_dir is None:
                raise ValueError("task_vector.hidden_from='finetuned' needs the category's trajectory")
            model = load_adapter(model, read_trajectory(trajectory_dir).adapter_dir, base_model_names(model_cfg))
        vector = hidden_state_task_vector(model, blocks)
    digest = save_tensors(
        out_path,
        {"task_vector": vector},
        {"category": category.name, "config": tv_cfg.model_dump(mode="json"), "kind": kind},
    )
    return {"path": str(out_path), "sha256": digest, "dim": int(vector.shape[0]), "kind": kind}


def load_task_vector(path: str | Path) -> torch.Tensor:
    """Read a ``task_vector`` tensor from a safetensors file; a sidecar, when present, must match its sha256
    (user-supplied files may come without one)."""
    return load_task_vector_with_kind(path)[0]


def load_task_vector_with_kind(path: str | Path) -> tuple[torch.Tensor, str | None]:
    """A task vector and its recorded kind (None when the file has no sidecar or no recorded kind)."""
    tensors, meta = load_tensors(path, verify=sidecar_path(path).is_file())
    if "task_vector" not in tensors:
        raise ValueError(f"{path}: no 'task_vector' tensor in this file")
    kind = meta.get("kind")
    return tensors["task_vector"], kind if isinstance(kind, str) else None


def vector_kinds(task_vector_paths: dict[str, str | Path]) -> str | None:
    """The one kind shared by the given task vectors (None if none records one).

    Raises:
        TaskVectorKindError: The vectors are of different kinds (the message names a category of each).
    """
    kinds: dict[str, str] = {}
    for name in sorted(task_vector_paths):
        kind = load_task_vector_with_kind(task_vector_paths[name])[1]
        if kind is not None:
            kinds.setdefault(kind, name)
    if len(kinds) > 1:
        raise TaskVectorKindError(
            "task vectors of different kinds cannot condition one generator: "
            + "; ".join(f"{name!r} is {kind!r}" for kind, name in kinds.items())
        )
    return next(iter(kinds), None)


def vector_config(task_vector_paths: dict[str, str | Path]) -> dict[str, Any] | None:
    """The task-vector config (``TaskVectorConfig`` fields) all the given vectors were computed with, from their
    sidecars; None when a sidecar lacks it or the vectors disagree. A generator records it, so that a new
    category's vector is computed the same way (number and length of samples) from its text alone."""
    configs = []
    for name in sorted(task_vector_paths):
        side = sidecar_path(task_vector_paths[name])
        config = read_json(side).get("meta", {}).get("config") if side.is_file() else None
        if not isinstance(config, dict):
            return None
        configs.append(config)
    return configs[0] if configs and all(c == configs[0] for c in configs) else None


def generator_training_data(
    trajectory_dirs: dict[str, str | Path], task_vector_paths: dict[str, str | Path]
) -> tuple[GeneratorDataset, dict[str, Any]]:
    """The data both generators (ICM-LoRA's CVAE and COND P-DIFF) train on: every category's trajectory
    checkpoints paired with its task vector, and the adapter config of the first category."""
    checkpoints = {name: load_trajectory_checkpoints(folder) for name, folder in trajectory_dirs.items()}
    vectors = {name: load_task_vector(path) for name, path in task_vector_paths.items()}
    trajectories = {name: read_trajectory(folder) for name, folder in trajectory_dirs.items()}
    files = {name: [t.folder / f for f in t.files] for name, t in trajectories.items()}  # named in layout errors
    dataset = build_dataset(checkpoints, vectors, sources=files)
    return dataset, next(iter(trajectories.values())).adapter_config


def final_lora_state(trajectory_dir: str | Path) -> dict[str, torch.Tensor]:
    """The LoRA state of a fine-tune's final adapter (the one evaluated as the category's LoRA)."""
    return read_adapter(read_trajectory(trajectory_dir).adapter_dir)[0]


class ValidationScorer:
    """Scores LoRA states on the categories' validation splits. ``scorer(states)`` is the criterion the
    generator's early stopping minimises; ``scorer.per_category(states)`` gives each category's validation NLL.
    Each state is merged into the shared base model in turn (``merged_state_into``) and scored on
    ``max_tokens`` of that category's validation split (evenly spaced blocks, tokenised once here).

    Criteria (``CVAEConfig.val_criterion``):

    - ``"mean_nll"``: the validation NLL per token, averaged over categories.
    - ``"worst_gap"``: the largest share of a category's base-to-LoRA validation gap that its generated adapter
      leaves unrecovered, ``max_c (nll_c - lora_c) / (base_c - lora_c)``: the worst category decides, so
      training does not stop while one category still lags behind the others. Needs ``reference``, each
      category's ``(base, LoRA)`` validation NLL (:meth:`with_reference`); a category whose LoRA does not beat
      the base model on validation by :data:`MIN_VALIDATION_GAP` is left out of it.
    """

    def __init__(
        self,
        blocks: dict[str, Any],
        model_cfg: ModelConfig,
        adapter_config: dict[str, Any],
        batch_size: int = 8,
        criterion: str = "mean_nll",
        reference: dict[str, tuple[float, float]] | None = None,
    ) -> None:
        if criterion not in ("mean_nll", "worst_gap"):
            raise ValueError(f"val_criterion: unknown criterion {criterion!r} (mean_nll, worst_gap)")
        self.blocks, self.model_cfg, self.adapter_config, self.batch_size = (
            blocks,
            model_cfg,
            adapter_config,
            batch_size,
        )
        self.criterion, self.reference = criterion, reference

    def per_category(self, states: dict[str, dict[str, torch.Tensor] | None]) -> dict[str, float]:
        """Validation NLL per token of each category's state (``None``: the base model itself)."""
        out = {}
        with shared_base_model(self.model_cfg) as base:
            for name in sorted(set(states) & set(self.blocks)):
                state = states[name]
                if state is None:
                    result = score_blocks(base, self.blocks[name], self.batch_size)
                else:
                    where = f"generated adapter for {name!r}"
                    start = first_adapted_layer(state)
                    with merged_state_into(base, state, self.adapter_config, where) as model:
                        result = score_blocks(model, self.blocks[name], self.batch_size, start)
                out[name] = result.nll_nats / result.tokens
        return out

    def with_reference(self, lora_states: dict[str, dict[str, torch.Tensor]]) -> ValidationScorer:
        """This scorer with each category's base-model and LoRA validation NLL as the worst-gap reference."""
        base = self.per_category(dict.fromkeys(lora_states))
        lora = self.per_category(lora_states)
        self.reference = {name: (base[name], lora[name]) for name in lora}
        return self

    def unrecovered(self, values: dict[str, float]) -> dict[str, float]:
        """Each category's share of its base-to-LoRA validation gap left unrecovered (0: as good as the LoRA)."""
        if self.reference is None:
            raise ValueError("the worst_gap criterion needs each category's base and LoRA validation NLL")
        return {
            name: (values[name] - lora) / (base - lora)
            for name, (base, lora) in self.reference.items()
            if name in values and base - lora >= MIN_VALIDATION_GAP
        }

    def criterion_of(self, values: dict[str, float]) -> float:
        """The stopping criterion of per-category validation NLLs (:meth:`per_category`'s output)."""
        if self.criterion == "worst_gap":
            shortfalls = self.unrecovered(values)
            if shortfalls:
                return max(shortfalls.values())
        return sum(values.values()) / len(values)

    def __call__(self, states: dict[str, dict[str, torch.Tensor]]) -> float:
        return self.criterion_of(self.per_category(states))


MIN_VALIDATION_GAP = 1e-4
"""Nats per token by which a category's LoRA must beat the base model on validation to count in the worst-gap
criterion (a smaller gap makes the share meaningless). When no category qualifies, the criterion is the mean
validation NLL."""


def validation_scorer(
    split_dirs: dict[str, str | Path],
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
    max_tokens: int,
    adapter_config: dict[str, Any],
    batch_size: int = 8,
    criterion: str = "mean_nll",
) -> ValidationScorer | None:
    """The :class:`ValidationScorer` of these categories. A category whose validation split is shorter than one
    block is left out; ``None`` when no category has a full block (the caller then trains to the ceiling)."""
    tokenizer = load_tokenizer(model_cfg)
    blocks = {}
    for name, folder in split_dirs.items():
        try:
            blocks[name] = eval_blocks(read_splits(folder).val, tokenizer, data_cfg.seq_len, max_tokens)
        except ValueError:
            continue  # fewer validation tokens than one block
    return ValidationScorer(blocks, model_cfg, adapter_config, batch_size, criterion) if blocks else None


def train_generator_stage(
    trajectory_dirs: dict[str, str | Path],
    task_vector_paths: dict[str, str | Path],
    cvae_cfg: CVAEConfig,
    out_path: str | Path,
    device: str = "cpu",
    on_epoch=None,
    resume: Resumer | None = None,
    validation: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train one CVAE on the trajectories of all categories and save the generator artifact.

    ``validation``: ``{"split_dirs": {category: splits folder}, "model_cfg": ..., "data_cfg": ...}``; with it
    (and ``cvae_cfg.val_every > 0``) training stops early on the generated adapters' validation scores
    (``cvae_cfg.val_criterion``; the worst-gap criterion scores the base model and each final LoRA once first)."""
    dataset, first = generator_training_data(trajectory_dirs, task_vector_paths)
    kind = vector_kinds(task_vector_paths)
    score = None
    if validation is not None and cvae_cfg.val_every > 0:
        score = validation_scorer(
            validation["split_dirs"],
            validation["model_cfg"],
            validation["data_cfg"],
            cvae_cfg.val_tokens,
            first,
            criterion=cvae_cfg.val_criterion,
        )
        if score is not None and cvae_cfg.val_criterion == "worst_gap":
            score.with_reference({name: final_lora_state(trajectory_dirs[name]) for name in score.blocks})
    generator, history, seconds = train_generator(
        dataset, cvae_cfg, first, device=device, on_epoch=on_epoch, resume=resume, score_adapters=score
    )
    extra: dict[str, Any] = {"history": history}
    if kind is not None:
        extra["task_vector_kind"] = kind
    tv_config = vector_config(task_vector_paths)
    if tv_config is not None:
        extra["task_vector_config"] = tv_config
    digest = save_generator(out_path, generator, extra)
    return {
        "path": str(out_path),
        "sha256": digest,
        "bytes": Path(out_path).stat().st_size,
        "num_checkpoints": int(dataset.weights.shape[0]),
        "flat_length": dataset.layout.total,
        "final_recon": history[-1]["recon"],
        "epochs_run": len(history),
        "best_epoch": next((row["epoch"] for row in history if row.get("best")), None),
        "seconds": seconds,
    }


def sample_adapter(
    generator_path: str | Path,
    out_dir: str | Path,
    sample_cfg: SampleConfig,
    category: str | None = None,
    task_vector: torch.Tensor | None = None,
    task_vector_source: str | Path | None = None,
    base_model: str | None = None,
    task_vector_kind: str | None = None,
) -> dict[str, Any]:
    """Generate an adapter folder for a known category or for a given task vector (``task_vector_source``,
    its file, is named in errors; a ``task_vector_kind`` other than the generator's is refused). ``base_model``
    replaces the ``base_model_name_or_path`` the generator's training adapters recorded (e.g. a hub id before
    publishing)."""
    generator = load_generator(generator_path)
    started = time.perf_counter()
    if task_vector is not None:
        where = task_vector_source or "task vector"
        state = generator.generate(task_vector, sample_cfg, where=where, kind=task_vector_kind)
    elif category is not None:
        state = generator.generate_for(category, sample_cfg)
    else:
        raise ValueError("sample_adapter needs a category or a task vector")
    seconds = time.perf_counter() - started
    adapter_config = dict(generator.adapter_config)
    if base_model:
        adapter_config["base_model_name_or_path"] = base_model
    write_adapter(out_dir, state, adapter_config)
    return {"adapter_dir": str(out_dir), "adapter_sha256": adapter_sha256(out_dir), "seconds": seconds}


def evaluate_adapter(
    data_dir: str | Path,
    adapter_dir: str | Path | None,
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
    eval_cfg: EvalConfig,
    out_path: str | Path | None = None,
    prefix_like: str | Path | None = None,
) -> dict[str, Any]:
    """PPL/BPC on the category's test split of the base model merged with ``adapter_dir`` (None: base model),
    with the NLL, token and character count of every scored block. The base model is loaded once per process
    and each adapter merged into it for the evaluation only (see ``merged_into``)."""
    started = time.perf_counter()
    tokenizer = load_tokenizer(model_cfg)
    texts = read_splits(data_dir).test
    with (
        shared_base_model(model_cfg) as base,
        merged_into(base, adapter_dir, base_model_names(model_cfg)) as model,
    ):
        # Layers below the adapter's first are the base model's: their states are computed once per block set.
        # The base model starts at the layer of ``prefix_like`` (an adapter scored next on these blocks): same numbers,
        # and its prefix pass fills the cache for that adapter.
        like = adapter_dir if adapter_dir is not None else prefix_like
        start = adapter_first_layer(like) if like is not None else 0
        score = evaluate_lm(model, tokenizer, texts, data_cfg.seq_len, eval_cfg, start).as_dict()
    result = {"adapter_dir": str(adapter_dir) if adapter_dir else None, **score}
    if out_path is not None:
        # The file holds what is reproducible (a rebuilt evaluation writes the same bytes, so what depends on it
        # stays cached); the wall time is only returned.
        write_json(out_path, result)
    return {**result, "seconds": time.perf_counter() - started}


def soup_adapter(trajectory_dirs: dict[str, str | Path], soup_cfg: SoupConfig, out_dir: str | Path) -> dict[str, Any]:
    """Model Soup: write the uniform average (over weight deltas) of adapters as one PEFT adapter folder.

    ``scope='all_categories'`` averages the final adapter of every category in ``trajectory_dirs``;
    ``scope='trajectory'`` averages the trajectory checkpoints of the single category given.
    """
    if soup_cfg.scope == "trajectory":
        if len(trajectory_dirs) != 1:
            raise ValueError(
                f"soup.scope='trajectory' averages one category's checkpoints, got {sorted(trajectory_dirs)}"
            )
        [(name, folder)] = trajectory_dirs.items()
        trajectory = read_trajectory(folder)
        adapters = [(state, trajectory.adapter_config) for state in load_trajectory_checkpoints(folder)]
        sources = [f"{name}/{Path(f).name}" for f in trajectory.files]
    else:
        adapters = [
            read_adapter(read_trajectory(trajectory_dirs[name]).adapter_dir) for name in sorted(trajectory_dirs)
        ]
        sources = [f"{name}/adapter" for name in sorted(trajectory_dirs)]
    state, config = model_soup(adapters, soup_cfg.max_rank)
    write_adapter(out_dir, state, config)
    return {
        "adapter_dir": str(out_dir),
        "adapter_sha256": adapter_sha256(out_dir),
        "rank": int(config["r"]),
        "sources": sources,
    }


def trajectory_mean_adapter(trajectory_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Reference point: the coordinate-wise mean of a category's own trajectory checkpoints (A and B averaged
    separately), written as an adapter with the trajectory's config. This is what a lookup table keyed by
    category would serve, and what COND P-DIFF's per-task statistics store (``norm.mean``)."""
    trajectory = read_trajectory(trajectory_dir)
    checkpoints = load_trajectory_checkpoints(trajectory_dir)
    state = {key: torch.stack([c[key].float() for c in checkpoints]).mean(0) for key in checkpoints[0]}
    write_adapter(out_dir, state, trajectory.adapter_config)
    return {
        "adapter_dir": str(out_dir),
        "adapter_sha256": adapter_sha256(out_dir),
        "sources": [Path(f).name for f in trajectory.files],
    }


def train_pdiff_stage(
    trajectory_dirs: dict[str, str | Path],
    task_vector_paths: dict[str, str | Path],
    pdiff_cfg: PDiffConfig,
    out_path: str | Path,
    device: str = "cpu",
    on_progress=None,
    resume: Resumer | None = None,
) -> dict[str, Any]:
    """Train the COND P-DIFF baseline on the same checkpoints and task vectors as the CVAE."""
    dataset, first = generator_training_data(trajectory_dirs, task_vector_paths)
    model, history, seconds = train_pdiff(
        dataset, pdiff_cfg, first, device=device, on_progress=on_progress, resume=resume
    )
    digest = save_pdiff(out_path, model, {"history": history})
    return {
        "path": str(out_path),
        "sha256": digest,
        "bytes": Path(out_path).stat().st_size,
        "num_checkpoints": int(dataset.weights.shape[0]),
        "flat_length": dataset.layout.total,
        "final_ae_recon": history["autoencoder"][-1]["recon"],
        "final_ddpm_loss": history["ddpm"][-1]["loss"],
        "seconds": seconds,
    }


def sample_pdiff_states(
    pdiff_path: str | Path, sample_cfg: SampleConfig, categories: list[str]
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any], float]:
    """COND P-DIFF's LoRA states for ``categories`` from one batched denoising pass (T steps for all of them,
    then decode and de-normalise), the PEFT adapter config to write them with, and the sampling seconds."""
    model = load_pdiff(pdiff_path)
    started = time.perf_counter()
    states = model.generate(categories, sample_cfg)
    return states, model.adapter_config, time.perf_counter() - started


def write_sampled_adapter(out_dir: str | Path, state: dict[str, torch.Tensor], adapter_config: dict[str, Any]) -> str:
    """Write one sampled LoRA state as a PEFT adapter folder; returns its content hash."""
    write_adapter(out_dir, state, adapter_config)
    return adapter_sha256(out_dir)


def generator_diagnostics(
    draw_dirs: dict[str, list[str | Path]],
    trajectory_dirs: dict[str, str | Path],
    out_path: str | Path,
    generator_path: str | Path | None = None,
    task_vector_paths: dict[str, str | Path] | None = None,
) -> dict[str, Any]:
    """Diagnostics of one generator's adapters (``draw_dirs``: per category, its draws, the scored one first):
    distance to the nearest training checkpoint of its own and of any other category, to its final adapter,
    spread across z draws; with ``generator_path`` (an ICM-LoRA generator) also the CVAE's latent usage."""
    draws = {name: [read_adapter(folder)[0] for folder in dirs] for name, dirs in draw_dirs.items()}
    checkpoints = {name: load_trajectory_checkpoints(folder) for name, folder in trajectory_dirs.items()}
    finals = {name: read_adapter(read_trajectory(folder).adapter_dir)[0] for name, folder in trajectory_dirs.items()}
    result: dict[str, Any] = {"categories": adapter_report(draws, checkpoints, finals)}
    if generator_path is not None:
        if task_vector_paths is None:
            raise ValueError("generator_diagnostics: latent usage needs the task vectors")
        dataset, _ = generator_training_data(trajectory_dirs, task_vector_paths)
        result["latent"] = latent_usage(load_generator(generator_path), dataset.weights, dataset.conds)
    write_json(out_path, result)
    return result
