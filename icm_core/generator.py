"""The LoRA generator: build its training set, train the CVAE, save it, and generate adapters.

One generator is trained on the trajectories of **all** categories at once, each checkpoint paired
with its category's task vector (the paper's multi-task claim). The generator artifact is a single
safetensors file plus sidecar that carries everything needed to generate: CVAE weights, the LoRA
layout, per-tensor normalisation statistics, condition centring/scale, the adapter config, and the
task vector of every training category. No real checkpoint is needed at generation time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from icm_core.config import CVAEConfig, SampleConfig
from icm_core.cvae import ConditionalVAE, train_cvae
from icm_core.flatten import (
    LoraLayout,
    NormStats,
    check_layout,
    denormalize,
    fit_norm_stats,
    flatten_lora,
    lora_layout,
    normalize,
    unflatten_lora,
)
from icm_core.io import ArtifactError, load_tensors, save_tensors
from icm_core.resume import Resumer
from icm_core.task_vectors import check_task_vector, check_task_vector_kind


@dataclass
class GeneratorDataset:
    """Flattened checkpoints [N, L], their conditions [N, C] and which category each row belongs to."""

    weights: torch.Tensor
    conds: torch.Tensor
    row_category: list[str]
    layout: LoraLayout
    task_vectors: dict[str, torch.Tensor]


def build_dataset(
    checkpoints: Mapping[str, Sequence[Mapping[str, torch.Tensor]]],
    task_vectors: Mapping[str, torch.Tensor],
    sources: Mapping[str, Sequence[str | Path]] | None = None,
) -> GeneratorDataset:
    """Flatten every checkpoint of every category; all must share one layout (same keys and ranks).
    ``sources`` (the checkpoint files, per category) names the offending file in errors."""
    if not checkpoints:
        raise ValueError("no categories: the generator needs at least one trajectory")
    missing = sorted(set(checkpoints) - set(task_vectors))
    if missing:
        raise ValueError(f"no task vector for categories {missing}")
    names = sorted(checkpoints)
    empty = [name for name in names if not checkpoints[name]]
    if empty:
        raise ValueError(f"category {empty[0]!r}: empty trajectory")
    layout = lora_layout(checkpoints[names[0]][0])
    dims = {name: tuple(task_vectors[name].shape) for name in names}
    if len(set(dims.values())) != 1 or len(next(iter(dims.values()))) != 1:
        raise ValueError(f"task vectors must all be 1-D of one size, got {dims}")
    rows, conds, owners = [], [], []
    for name in names:
        if not checkpoints[name]:
            raise ValueError(f"category {name!r}: empty trajectory")
        for i, state in enumerate(checkpoints[name]):
            where = f"category {name!r} checkpoint {i}"
            if sources is not None:
                where = f"{sources[name][i]} ({where})"
            check_layout(state, layout, where=where)
            rows.append(flatten_lora(state, layout)[0])
            conds.append(task_vectors[name].float())
            owners.append(name)
    vectors = {name: task_vectors[name].float() for name in names}
    return GeneratorDataset(torch.stack(rows), torch.stack(conds), owners, layout, vectors)


@dataclass
class ConditionNorm:
    """Centre task vectors on their training mean and scale them to unit RMS.

    Last-layer hidden states share a large common component and a large norm; centring keeps what
    tells categories apart, and the scale keeps the condition commensurate with the latent.
    """

    mean: torch.Tensor
    scale: float

    @classmethod
    def fit(cls, vectors: torch.Tensor) -> ConditionNorm:
        mean = vectors.mean(0)
        centred = vectors - mean
        rms = float(centred.pow(2).mean().sqrt())
        return cls(mean, rms if rms > 1e-8 else 1.0)

    def __call__(self, vectors: torch.Tensor) -> torch.Tensor:
        return (vectors - self.mean) / self.scale


@dataclass
class Generator:
    """A trained CVAE plus everything needed to turn its output into a PEFT adapter."""

    model: ConditionalVAE
    layout: LoraLayout
    norm: NormStats
    cond_norm: ConditionNorm
    adapter_config: dict[str, Any]
    task_vectors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def cond_dim(self) -> int:
        return self.model.cond_dim

    @property
    def task_vector_kind(self) -> str | None:
        """The kind of task vector the generator was trained on (sidecar ``task_vector_kind``), if recorded."""
        kind = self.meta.get("task_vector_kind")
        return kind if isinstance(kind, str) else None

    @torch.no_grad()
    def generate(
        self,
        task_vector: torch.Tensor,
        cfg: SampleConfig | None = None,
        where: str | Path = "task vector",
        kind: str | None = None,
    ) -> dict[str, torch.Tensor]:
        """z ~ N(0, I) + task vector -> LoRA state dict (peft key names). ``where`` names the vector's source
        (its file, say) in errors; ``kind``, the vector's kind, must match the generator's (when both are known).
        """
        cfg = cfg or SampleConfig()
        check_task_vector_kind(self.task_vector_kind, kind, where)
        task_vector = check_task_vector(task_vector, self.cond_dim, where)
        rng = torch.Generator(device="cpu").manual_seed(cfg.seed)
        self.model.eval()
        device = next(self.model.parameters()).device
        cond = self.cond_norm(task_vector).unsqueeze(0).repeat(cfg.num_draws, 1)
        z = torch.randn(cfg.num_draws, self.model.latent_dim, generator=rng)
        flat = self.model.decode(z.to(device), cond.to(device)).float().cpu().mean(0)
        return unflatten_lora(denormalize(flat.unsqueeze(0), self.norm, self.layout)[0], self.layout)

    def generate_for(self, category: str, cfg: SampleConfig | None = None) -> dict[str, torch.Tensor]:
        if category not in self.task_vectors:
            raise KeyError(f"category {category!r} is not known to this generator ({sorted(self.task_vectors)})")
        return self.generate(self.task_vectors[category], cfg)


VALIDATION_Z_SEED: int = 0
"""Seed of the z draw that validation decodes (the default ``SampleConfig.seed``: what the demo scores)."""


def adapter_validator(
    dataset: GeneratorDataset,
    norm: NormStats,
    cond_norm: ConditionNorm,
    score_adapters: Callable[[dict[str, dict[str, torch.Tensor]]], float],
) -> Callable[[ConditionalVAE], float]:
    """``model -> score``: decode every training category's adapter as generation would (eval mode, one z draw
    with :data:`VALIDATION_Z_SEED`, de-normalised, unflattened) and hand them to ``score_adapters``. The z draw
    comes from its own generator, so validating never moves torch's global random stream."""
    names = sorted(dataset.task_vectors)
    conds = cond_norm(torch.stack([dataset.task_vectors[n].float() for n in names]))

    @torch.no_grad()
    def validate(model: ConditionalVAE) -> float:
        device = next(model.parameters()).device
        # The same draw for every category, as Generator.generate(seed=VALIDATION_Z_SEED) makes for each.
        rng = torch.Generator(device="cpu").manual_seed(VALIDATION_Z_SEED)
        z = torch.randn(1, model.latent_dim, generator=rng).repeat(len(names), 1)
        flat = model.decode(z.to(device), conds.to(device)).float().cpu()
        rows = denormalize(flat, norm, dataset.layout)
        return score_adapters({n: unflatten_lora(rows[i], dataset.layout) for i, n in enumerate(names)})

    return validate


def train_generator(
    dataset: GeneratorDataset,
    cfg: CVAEConfig,
    adapter_config: dict[str, Any],
    device: str | torch.device = "cpu",
    on_epoch: Callable[[int, dict], None] | None = None,
    resume: Resumer | None = None,
    score_adapters: Callable[[dict[str, dict[str, torch.Tensor]]], float] | None = None,
) -> tuple[Generator, list[dict], float]:
    """Normalise the dataset, train the CVAE on all categories at once; return (generator, history, seconds).
    ``resume``: save resumable state every ``resume.every["epochs"]`` epochs and continue from a saved one.
    ``score_adapters``: scores ``{category: LoRA state dict}`` (lower is better, e.g. the mean validation NLL);
    with it, every ``cfg.val_every`` epochs each training category's adapter is generated (z drawn with seed
    :data:`VALIDATION_Z_SEED`) and scored, and training stops early on it (``icm_core.cvae.EarlyStopping``)."""
    # 1) Per-tensor z-score (after per-coordinate centring with normalization='coordinate') over all
    #    checkpoints of all categories; the stats travel with the generator.
    norm = fit_norm_stats(dataset.weights, dataset.layout, center=cfg.normalization == "coordinate")
    weights = normalize(dataset.weights, norm, dataset.layout)
    # 2) Condition normalisation, fitted on the distinct category vectors (not weighted by trajectory length).
    cond_norm = ConditionNorm.fit(torch.stack([dataset.task_vectors[n] for n in sorted(dataset.task_vectors)]))
    conds = cond_norm(dataset.conds)
    # 3) One CVAE for every category.
    validate = None
    if score_adapters is not None and cfg.val_every > 0:
        validate = adapter_validator(dataset, norm, cond_norm, score_adapters)
    started = time.perf_counter()
    model, history = train_cvae(
        weights, conds, cfg, device=device, on_epoch=on_epoch, resume=resume, validate=validate
    )
    # Wall time is returned, not stored in the artifact: equal inputs must give byte-identical files.
    seconds = time.perf_counter() - started
    meta = {
        "num_checkpoints": int(dataset.weights.shape[0]),
        "categories": sorted(dataset.task_vectors),
    }
    generator = Generator(model, dataset.layout, norm, cond_norm, adapter_config, dict(dataset.task_vectors), meta)
    return generator, history, seconds


def save_generator(path: str | Path, generator: Generator, extra_meta: dict[str, Any] | None = None) -> str:
    """Write the generator as one safetensors file + sidecar; returns the file's sha256."""
    tensors = {f"cvae.{k}": v for k, v in generator.model.state_dict().items()}
    tensors["norm.mean"] = generator.norm.mean
    tensors["norm.std"] = generator.norm.std
    if generator.norm.center is not None:
        tensors["norm.center"] = generator.norm.center
    tensors["cond.mean"] = generator.cond_norm.mean
    for name, vector in generator.task_vectors.items():
        tensors[f"task_vector.{name}"] = vector
    model = generator.model
    meta = {
        "kind": "icm-lora-generator",
        "cvae_config": model.cfg.model_dump(mode="json"),
        "input_len": model.input_len,
        "cond_dim": model.cond_dim,
        "cond_scale": generator.cond_norm.scale,
        "layout": generator.layout.to_json(),
        "adapter_config": generator.adapter_config,
        "categories": sorted(generator.task_vectors),
        **generator.meta,
        **(extra_meta or {}),
    }
    return save_tensors(path, tensors, meta)


def load_generator(path: str | Path, device: str | torch.device = "cpu") -> Generator:
    """Load a generator artifact (sha256-verified) ready to generate."""
    tensors, meta = load_tensors(path)
    if meta.get("kind") != "icm-lora-generator":
        raise ArtifactError(f"{path}: not an icm-lora generator (sidecar kind {meta.get('kind')!r})")
    cfg = CVAEConfig.model_validate(meta["cvae_config"])
    model = ConditionalVAE(int(meta["input_len"]), int(meta["cond_dim"]), cfg)
    state = {k.removeprefix("cvae."): v for k, v in tensors.items() if k.startswith("cvae.")}
    model.load_state_dict(state)
    model.to(device).eval()
    task_vectors = {k.removeprefix("task_vector."): v for k, v in tensors.items() if k.startswith("task_vector.")}
    return Generator(
        model=model,
        layout=LoraLayout.from_json(meta["layout"]),
        norm=NormStats(tensors["norm.mean"], tensors["norm.std"], tensors.get("norm.center")),
        cond_norm=ConditionNorm(tensors["cond.mean"], float(meta["cond_scale"])),
        adapter_config=meta["adapter_config"],
        task_vectors=task_vectors,
        meta=meta,
    )
