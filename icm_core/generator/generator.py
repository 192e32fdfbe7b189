"""The LoRA generator: build its training set, train the CVAE, save it, and generate adapters.

One generator is trained on the trajectories of **all** categories at once, each checkpoint paired
with its category's task vector (the paper's multi-task claim). The generator artifact is a single
safetensors file plus sidecar that carries everything needed to generate: CVAE weights, the LoRA
layout, per-tensor normalisation statistics, condition centring/scale, the adapter config, and the
task vector of every training category. No real checkpoint is needed at generation time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from icm_core.generator.config import CVAEConfig, SampleConfig
from icm_core.generator.cvae import ConditionalVAE
from icm_core.generator.task_vectors import check_task_vector, check_task_vector_kind
from icm_core.infra.io import ArtifactError, load_tensors, save_tensors
from icm_core.lora.flatten import (
    LoraLayout,
    NormStats,
    denormalize,
    unflatten_lora,
)


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
