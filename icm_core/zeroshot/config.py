"""Configs of the leave-out protocol for categories the generator has never seen."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from icm_core.data.config import DataConfig
from icm_core.evaluation.config import EvalConfig
from icm_core.generator.config import CVAEConfig, SampleConfig, TaskVectorConfig
from icm_core.infra.config import ResumeConfig, StageConfig
from icm_core.lora.config import LoraTrainConfig
from icm_core.models.config import ModelConfig


class ZeroShotConfig(StageConfig):
    """The leave-out protocol (``flows/zeroshot.py``): folds over categories, baselines and intervals."""

    folds: int = Field(4, ge=2, description="K: folds over categories; each fold's categories are held out once.")
    fold_seed: int = Field(0, description="Seed of the deterministic assignment of categories to folds.")
    knn_k: int = Field(3, ge=1, description="Neighbours averaged by the softmax k-NN baseline (1-NN uses one).")
    knn_temperature: float = Field(
        0.05, gt=0, description="Softmax temperature over cosine similarities of the softmax k-NN baseline."
    )
    multitask_steps: int = Field(
        200,
        ge=1,
        description="Optimizer steps of the multi-task LoRA on a fold's pooled training text (same rank, batch, "
        "lr schedule and layers as the per-category LoRA). Default 5x the per-category budget; its loss curve "
        "is written to the results so convergence can be checked.",
    )
    bootstrap_samples: int = Field(2000, ge=10, description="Paired bootstrap resamples of test blocks.")
    seed: int = Field(0, description="Seed of the bootstrap.")
    interim_reports: bool = Field(
        True,
        description="Score each fold's held-out categories as soon as its adapters exist and write an interim "
        "report over the folds done so far to <results_dir>/interim/ (removed by the final report), so a benchmark "
        "split across sessions shows numbers before its last fold.",
    )
    cross_matrix_tokens: int = Field(
        1024,
        ge=0,
        description="Test tokens per category for the cross-category matrix (every category's own LoRA scored "
        "on every category's test text: N^2 evaluations, the figure that shows the categories are distinct); "
        "0 leaves it out. Equal to eval.max_tokens, its diagonal and base scores are the protocol's own.",
    )
    scaling_sizes: tuple[int, ...] = Field(
        (8, 16),
        description="Training-set sizes of the scaling curve: in every fold, one more generator per size, trained "
        "on that many of the fold's training categories (nested subsets of one seeded shuffle) and scored on the "
        "fold's held-out categories as 'icm_lora@<size>'; the fold's full generator is the curve's last point. "
        "Sizes not below a fold's training count are skipped; () turns the curve off.",
    )
    functional_steps: int = Field(
        300,
        ge=0,
        description="Steps of the functional fine-tune of each fold's generator decoder through the frozen base "
        "model (method 'icm_functional', icm_core/zeroshot/functional.py; one training category per step, so 300 "
        "is about 10 visits per category of a 30-category fold, ~1.3 s a step on 2 CPU cores); 0 leaves the "
        "variant out.",
    )
    functional_lr: float = Field(1e-4, gt=0, description="AdamW learning rate of the functional fine-tune.")
    functional_batch_blocks: int = Field(2, ge=1, description="Training blocks per functional step.")
    functional_recon_weight: float = Field(
        1.0, ge=0, description="Weight of the reconstruction anchor in the functional fine-tune."
    )


class SelectorConfig(StageConfig):
    """The selector (``icm_core/zeroshot/selector.py``): a new category's adapter chosen among everything the
    library can give, by held-out NLL on the category's own k samples (never its validation or test text)."""

    splits: int = Field(
        2,
        ge=2,
        description="Cross-fitting folds over the k sample blocks: a seeded permutation of the blocks dealt "
        "round-robin. A candidate fitted on the samples (mix, fine-tune) is fitted once per fold on the other "
        "folds' blocks and scored on that fold's; every block is held out exactly once, so each candidate's score "
        "is its NLL over all k blocks.",
    )
    seed: int = Field(
        0, description="Seed of the fold assignment, the mix's weight draws and the fine-tune's batches."
    )
    tie_nats: float = Field(
        1e-3,
        ge=0,
        description="Candidates whose held-out NLL (nats a token) is within this of the lowest tie; the cheapest "
        "of them wins (stored adapter < k-NN < generator draw < mix < fine-tune).",
    )
    draws: int = Field(3, ge=0, description="z draws per generator, each its own candidate (seeds 0..draws-1).")
    mix_top: int = Field(
        3,
        ge=0,
        description="LoraHub-style mix: the best this many candidates (by NLL on the fitting blocks); 0: none.",
    )
    mix_trials: int = Field(
        8,
        ge=1,
        description="Weight vectors tried for the mix (uniform, then Dirichlet(1) draws); the best on the "
        "fitting blocks is kept.",
    )
    finetune_steps: int = Field(
        3, ge=0, description="AdamW steps of the fine-tune started from the multi-task LoRA; 0: none."
    )
    finetune_lr: float = Field(3e-3, gt=0, description="Learning rate of that fine-tune (the per-category LoRA's).")
    finetune_batch: int = Field(4, ge=1, description="Sample blocks per fine-tune step.")
    batch_size: int = Field(8, ge=1, description="Blocks per forward pass when scoring.")
    budget_s: float = Field(
        45.0,
        gt=0,
        description="Seconds after which the optional candidates (mix, fine-tune) are skipped (logged), so that an "
        "adapter is served within the minute.",
    )


class ServingConfig(StageConfig):
    """What the registry serves a category (``flows/retrain.py``): (1) the selector's choice as soon as the category
    is added, (2) once the retrain is done, its own fine-tuned LoRA, or the retrained generator's adapter where
    ``after_finetune`` chooses storage over quality."""

    after_finetune: Literal["fine-tuned", "generator"] = Field(
        "fine-tuned",
        description="What replaces the selector's adapter when the retrain is done: 'fine-tuned' (the category's own "
        "LoRA, the best adapter the benchmark knows) or 'generator' (the retrained generator's adapter: only the "
        "generator need be stored, at a loss of quality; results/demo).",
    )
    selector: SelectorConfig = Field(default_factory=SelectorConfig, description="The selector of a new category.")


class ZeroShotRunConfig(StageConfig):
    """All configs of one leave-out run. Defaults: SmolLM2 on CPU, the library read at 120k characters per
    category, the demo's per-category LoRA budget, Eq. 1 task vectors on the **base** model, a 30-epoch CVAE."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="Base model.")
    data: DataConfig = Field(
        default_factory=lambda: DataConfig(max_chars=120_000), description="Splits and token blocks."
    )
    lora: LoraTrainConfig = Field(default_factory=LoraTrainConfig, description="Per-category (oracle) LoRA.")
    task_vector: TaskVectorConfig = Field(
        default_factory=lambda: TaskVectorConfig(hidden_from="base"),
        description="Task vectors; must be computable from a category's text alone (hidden_from=base, or "
        "source=description).",
    )
    cvae: CVAEConfig = Field(
        default_factory=lambda: CVAEConfig(epochs=30),
        description="The generator. 30 epochs (one cosine schedule over 30), not the demo's ceiling of 60: the "
        "leave-out flow has no validation text to stop on, a fold's generator sees ~6x the demo's checkpoints per "
        "epoch, and the demo's validation curves stop improving by epoch 20 (docs/evaluation.md).",
    )
    sample: SampleConfig = Field(default_factory=SampleConfig, description="Adapter sampling.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Per-block NLL evaluation (max_tokens cap).")
    zeroshot: ZeroShotConfig = Field(default_factory=ZeroShotConfig, description="Folds, baselines, bootstrap.")
    selector: SelectorConfig = Field(
        default_factory=SelectorConfig, description="The selector method (a held-out category's best candidate)."
    )
    resume: ResumeConfig = Field(
        default_factory=ResumeConfig, description="How often long stages save resumable state (not in cache keys)."
    )

    @model_validator(mode="after")
    def _unseen_vectors(self) -> ZeroShotRunConfig:
        if self.task_vector.source == "hidden_state" and self.task_vector.hidden_from == "finetuned":
            raise ValueError(
                "task_vector.hidden_from: 'finetuned' needs the category's own fine-tune, which a held-out "
                "category does not have; use 'base' (Eq. 1 on the base model) or source='description'"
            )
        return self
