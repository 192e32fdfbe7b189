"""The run config: every stage's config in one frozen model, the methods a run evaluates, and the loader.

Each stage's own config sits beside its code (``icm_core/<package>/config.py``); every field is documented and
unknown fields are rejected. The configs are plain data: they hash deterministically
(:func:`~icm_core.infra.config.config_fingerprint`), so the pipeline uses them in cache keys, and they render as
parameter forms in the Prefect UI.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, Field

from icm_core.baselines.config import PDiffConfig, SoupConfig
from icm_core.data.config import DataConfig
from icm_core.evaluation.config import DiagnosticsConfig, EvalConfig
from icm_core.generator.config import CVAEConfig, SampleConfig, TaskVectorConfig
from icm_core.infra.config import ResumeConfig, StageConfig
from icm_core.lora.config import LoraTrainConfig
from icm_core.models.config import ModelConfig
from icm_core.zeroshot.config import ServingConfig


METHOD_NAMES: tuple[str, ...] = (
    "base",
    "lora",
    "trajectory_mean",
    "soup_own",
    "model_soup",
    "cond_pdiff",
    "cond_pdiff_shared",
    "icm_lora",
)
"""Every method the pipeline can evaluate, in report order."""
METHOD_TITLES: dict[str, str] = {
    "base": "Original model",
    "lora": "Original LoRA",
    "trajectory_mean": "Trajectory mean (own checkpoints)",
    "soup_own": "Model Soup (own trajectory)",
    "model_soup": "Model Soup (all categories)",
    "cond_pdiff": "COND P-DIFF",
    "cond_pdiff_shared": "COND P-DIFF (shared norm)",
    "icm_lora": "ICM-LoRA",
}
"""Display names of the methods in tables and figures (the language and the detection reports)."""
REFERENCE_METHODS: tuple[str, ...] = ("trajectory_mean", "soup_own")
"""Seen-category reference points built from the category's own checkpoints (no generator involved)."""
DEFAULT_METHODS: tuple[str, ...] = tuple(m for m in METHOD_NAMES if m != "cond_pdiff_shared")
"""What the demo builds: every method but the COND P-DIFF variant (a second diffusion model to train; the
multi-seed results command adds it)."""


class RunConfig(StageConfig):
    """All stage configs of one ICM-LoRA run. The defaults are the CPU demo on SmolLM2-135M."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="Base model.")
    data: DataConfig = Field(default_factory=DataConfig, description="Splits and token blocks.")
    lora: LoraTrainConfig = Field(default_factory=LoraTrainConfig, description="Per-category LoRA fine-tuning.")
    task_vector: TaskVectorConfig = Field(default_factory=TaskVectorConfig, description="Task vectors.")
    cvae: CVAEConfig = Field(default_factory=CVAEConfig, description="The generator.")
    sample: SampleConfig = Field(default_factory=SampleConfig, description="Adapter sampling.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="PPL / BPC evaluation.")
    soup: SoupConfig = Field(default_factory=SoupConfig, description="The Model Soup baseline.")
    pdiff: PDiffConfig = Field(default_factory=PDiffConfig, description="The COND P-DIFF baseline.")
    resume: ResumeConfig = Field(
        default_factory=ResumeConfig, description="How often long stages save resumable state (not in cache keys)."
    )
    methods: tuple[
        Literal[
            "base", "lora", "trajectory_mean", "soup_own", "model_soup", "cond_pdiff", "cond_pdiff_shared", "icm_lora"
        ],
        ...,
    ] = Field(
        DEFAULT_METHODS,
        min_length=1,
        description="Methods to build and evaluate: base (original model), lora (original LoRA), trajectory_mean "
        "(coordinate mean of the category's own checkpoints), soup_own (Model Soup of the category's own "
        "trajectory), model_soup (the soup.scope soup, by default one of all categories' final adapters), "
        "cond_pdiff, cond_pdiff_shared (COND P-DIFF with one shared normalisation), icm_lora. base, lora and "
        "icm_lora are always evaluated (the gain is measured against them).",
    )
    seeds: int = Field(
        1,
        ge=1,
        le=100,
        description="Run the method with this many seeds: seed i adds i to lora.seed, cvae.seed, pdiff.seed and "
        "sample.seed (LoRA fine-tune, generator training, z draw); the data split and the test blocks stay the "
        "same. The report gives mean and spread across seeds. Seed 0 is exactly the one-seed run.",
    )
    diagnostics: DiagnosticsConfig = Field(
        default_factory=lambda: DiagnosticsConfig(), description="Generator diagnostics (z draws)."
    )
    serving: ServingConfig = Field(
        default_factory=ServingConfig, description="What the registry serves a new category (flows/retrain.py)."
    )


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {dotted!r}: {part!r} is not a section")
    node[parts[-1]] = value


ConfigT = TypeVar("ConfigT", bound=BaseModel)

CONFIG_ENV = "ICM_LORA_CONFIG"
"""A run config file (YAML/JSON) that every command taking a run config uses when it is given no ``--config``: a
machine's own defaults, e.g. a GPU worker's model, device and budgets. Unset: the built-in CPU demo settings."""


def load_run_config(
    path: str | Path | None = None, overrides: list[str] | None = None, config_cls: type[ConfigT] = RunConfig
) -> ConfigT:
    """Read a YAML/JSON run config (sections model, data, lora, task_vector, cvae, sample, eval) and apply
    ``section.field=value`` overrides (values parsed as YAML). Errors name the file and the field.
    ``config_cls`` is the config to validate into (the detection flow passes its own). Without ``path``, a
    :class:`RunConfig` comes from the file ``$ICM_LORA_CONFIG`` names, when it is set (:data:`CONFIG_ENV`)."""
    import yaml
    from pydantic import ValidationError

    if path is None and config_cls is RunConfig:
        path = os.environ.get(CONFIG_ENV) or None
    tree: dict[str, Any] = {}
    where = "config"
    if path is not None:
        path = Path(path)
        where = str(path)
        if not path.is_file():
            raise ValueError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: not valid YAML/JSON ({exc})") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"{path}: top level must be a mapping of sections")
        tree = loaded or {}
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected section.field=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw))
    try:
        return config_cls.model_validate(tree)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors())
        raise ValueError(f"{where}: {problems}") from None
