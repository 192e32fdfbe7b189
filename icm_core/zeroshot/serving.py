"""Serving a new category: the serving library on disk, its candidates for a category's text, the chosen adapter.

A serving library is a folder with ``library.json`` and the artifacts it names (paths relative to the folder):

    library.json            {"kind": "icm-lora-library", "format_version": 1, "stored": {name: {"kind", "adapter"}},
                             "categories": {name: {"adapter", "task_vector"}}, "generators": {name: file},
                             "multitask": name | null, "knn": {"k", "temperature"},
                             "task_vector": {"kind", "config"}}
    stored/<name>/          PEFT folders: the multi-task LoRA, the mean LoRA
    categories/<name>/      each library category's own adapter (PEFT folder) and task vector
    generators/<name>.safetensors

:func:`adapt_from_text` (``icm-lora adapt``) computes a new category's task vector from its text the way the library's
vectors were computed, builds every candidate (:func:`library_candidates`), lets the selector choose
(:mod:`icm_core.zeroshot.selector`) on the same k sample blocks, and writes the winner as a PEFT folder with
``selection.json`` (every candidate's held-out NLL) inside. Nothing here imports Prefect.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from icm_core.data.text import DataError
from icm_core.data.tokens import sample_blocks, token_blocks
from icm_core.evaluation.perplexity import EvalBlocks, prefix_states
from icm_core.generator.config import TaskVectorConfig
from icm_core.generator.task_vectors import (
    hidden_state_task_vector,
    load_task_vector_with_kind,
    vector_config,
    vector_kinds,
)
from icm_core.infra.io import ArtifactError, atomic_folder, read_json, sidecar_path
from icm_core.lora.adapters import adapter_first_layer, write_adapter
from icm_core.lora.arithmetic import weighted_delta_adapter
from icm_core.models.base_model import load_base_model, load_tokenizer
from icm_core.models.config import ModelConfig
from icm_core.models.prefix import layers_from
from icm_core.zeroshot.config import SelectorConfig
from icm_core.zeroshot.from_text import DEFAULT_MAX_CHARS, plan_from_recorded, read_text_source, text_source_sha256
from icm_core.zeroshot.selector import (
    Candidate,
    Selection,
    generator_candidates,
    knn_candidate,
    select_adapter,
    stored_candidate,
)


__all__ = [
    "LIBRARY_FILE",
    "Library",
    "adapt_from_text",
    "library_candidates",
    "prefix_task_vector",
    "read_library",
    "sample_text_blocks",
    "selection_record",
    "write_library",
    "write_selection",
]

LIBRARY_FILE = "library.json"
LIBRARY_KIND = "icm-lora-library"


@dataclass(frozen=True)
class Library:
    """A serving library's artifacts (absolute paths) and settings."""

    stored: dict[str, tuple[str, Path]]
    categories: dict[str, Path]
    vectors: dict[str, Path]
    generators: dict[str, Path]
    multitask: str | None
    knn_k: int
    knn_temperature: float
    vector_kind: str | None
    vector_config: dict[str, Any] | None


def write_library(
    out: str | Path,
    stored: Mapping[str, str | Path],
    categories: Mapping[str, str | Path],
    vectors: Mapping[str, str | Path],
    generators: Mapping[str, str | Path],
    multitask: str | None,
    knn_k: int = 3,
    knn_temperature: float = 0.05,
) -> Path:
    """Copy a library's adapters, vectors and generators into ``out`` (atomically) with its ``library.json``.

    Raises:
        ValueError: ``multitask`` is not a stored adapter, or a category lacks its vector.
    """
    if multitask is not None and multitask not in stored:
        raise ValueError(f"library: multitask={multitask!r} is not one of the stored adapters {sorted(stored)}")
    missing = sorted(set(categories) ^ set(vectors))
    if missing:
        raise ValueError(f"library: every category needs an adapter and a task vector; unmatched: {missing}")
    vector_files = {n: Path(p) for n, p in vectors.items()}
    manifest: dict[str, Any] = {
        "kind": LIBRARY_KIND,
        "format_version": 1,
        "stored": {},
        "categories": {},
        "generators": {},
        "multitask": multitask,
        "knn": {"k": knn_k, "temperature": knn_temperature},
        "task_vector": {"kind": vector_kinds(vector_files), "config": vector_config(vector_files)},
    }
    with atomic_folder(out) as tmp:
        for name, folder in sorted(stored.items()):
            shutil.copytree(folder, tmp / "stored" / name)
            manifest["stored"][name] = {
                "kind": "knn" if name.startswith("knn") else "stored",
                "adapter": f"stored/{name}",
            }
        for name in sorted(categories):
            shutil.copytree(categories[name], tmp / "categories" / name / "adapter")
            for source in (vector_files[name], sidecar_path(vector_files[name])):
                shutil.copy2(source, tmp / "categories" / name / source.name)
            manifest["categories"][name] = {
                "adapter": f"categories/{name}/adapter",
                "task_vector": f"categories/{name}/{vector_files[name].name}",
            }
        for name, path in sorted(generators.items()):
            (tmp / "generators").mkdir(exist_ok=True)
            for source in (Path(path), sidecar_path(path)):
                shutil.copy2(source, tmp / "generators" / f"{name}{source.name[len(Path(path).stem) :]}")
            manifest["generators"][name] = f"generators/{name}.safetensors"
        (tmp / LIBRARY_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return Path(out)


def read_library(folder: str | Path) -> Library:
    """A serving library's manifest, checked: every named file exists.

    Raises:
        ArtifactError: ``library.json`` is missing, of another kind, or names a file that does not exist (the
            message names the file and the field).
    """
    folder = Path(folder)
    path = folder / LIBRARY_FILE
    if not path.is_file():
        raise ArtifactError(f"{path}: not found (a serving library folder holds library.json)")
    manifest = read_json(path)
    if not isinstance(manifest, dict) or manifest.get("kind") != LIBRARY_KIND:
        raise ArtifactError(f"{path}: not a serving library (kind {manifest.get('kind')!r}, want {LIBRARY_KIND!r})")

    def existing(relative: Any, field: str) -> Path:
        target = folder / str(relative)
        if not isinstance(relative, str) or not target.exists():
            raise ArtifactError(f"{path}: {field} names {relative!r}, which does not exist in {folder}")
        return target

    try:
        stored = {n: (e["kind"], existing(e["adapter"], f"stored.{n}")) for n, e in manifest["stored"].items()}
        categories = {n: existing(e["adapter"], f"categories.{n}") for n, e in manifest["categories"].items()}
        vectors = {n: existing(e["task_vector"], f"categories.{n}") for n, e in manifest["categories"].items()}
        generators = {n: existing(f, f"generators.{n}") for n, f in manifest["generators"].items()}
        knn, tv = manifest["knn"], manifest["task_vector"]
        library = Library(stored, categories, vectors, generators, manifest["multitask"], int(knn["k"]),
                          float(knn["temperature"]), tv["kind"], tv["config"])  # fmt: skip
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise ArtifactError(f"{path}: malformed ({type(exc).__name__}: {exc})") from exc
    if library.multitask is not None and library.multitask not in stored:
        raise ArtifactError(f"{path}: multitask names {library.multitask!r}, not a stored adapter")
    return library


def sample_text_blocks(texts: Sequence[str], tokenizer, tv_cfg: TaskVectorConfig) -> torch.Tensor:
    """The k sample blocks a category's task vector averages (Eq. 1): the selector scores on these, nothing else."""
    return sample_blocks(token_blocks(texts, tokenizer, tv_cfg.sample_tokens), tv_cfg.num_samples, tv_cfg.seed)


@torch.no_grad()
def prefix_task_vector(model: torch.nn.Module, blocks: torch.Tensor, start: int, batch_size: int) -> torch.Tensor:
    """Eq. 1 on the base model (mean last-layer, last-token hidden state) from the states entering decoder layer
    ``start`` (:func:`~icm_core.evaluation.perplexity.prefix_states`): the layers below ``start`` run once for the
    task vector and every candidate's scoring on the same blocks, only layers ``start..`` run here. Equals
    :func:`~icm_core.generator.task_vectors.hidden_state_task_vector` on the same blocks."""
    if start <= 0:
        return hidden_state_task_vector(model, blocks, batch_size)
    shared = EvalBlocks(blocks, torch.ones(blocks.shape[0], blocks.shape[1] - 1, dtype=torch.long))
    states = prefix_states(model, shared, start, batch_size)
    was_training = model.training
    model.eval()
    rows = []
    try:
        with layers_from(model, start):
            for batch in states:
                out = model(inputs_embeds=batch, output_hidden_states=True, use_cache=False)
                rows.append(out.hidden_states[-1][:, -1, :].float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(rows).mean(dim=0)


def library_candidates(
    stored: Mapping[str, tuple[str, str | Path]],
    categories: Mapping[str, str | Path],
    vectors: Mapping[str, str | Path],
    generators: Mapping[str, str | Path],
    query: torch.Tensor | None,
    query_kind: str | None,
    draws: int,
    knn_k: int | None = None,
    knn_temperature: float = 0.05,
    mean: bool = False,
) -> list[Candidate]:
    """Every candidate a library gives a category: its stored adapters, every category's own adapter
    (``lora:<category>``), the softmax k-NN adapter over them (when ``knn_k`` is given and no stored one is named
    ``knn_softmax``), their mean (``mean``, when no stored one is named ``mean_lora``) and ``draws`` z draws of
    every generator."""
    candidates = [stored_candidate(name, folder, kind) for name, (kind, folder) in sorted(stored.items())]
    own = {name: stored_candidate(f"lora:{name}", folder) for name, folder in sorted(categories.items())}
    candidates += list(own.values())
    if mean and len(own) > 1 and "mean_lora" not in stored:
        parts = list(own.values())
        state, config = weighted_delta_adapter([(c.state, c.config) for c in parts], [1 / len(parts)] * len(parts))
        candidates.append(Candidate("mean_lora", "stored", state, config, {"parts": sorted(own)}))
    if query is not None and knn_k is not None and own and "knn_softmax" not in stored:
        keys = {name: load_task_vector_with_kind(vectors[name])[0] for name in own}
        candidates.append(knn_candidate(query, keys, own, knn_k, knn_temperature))
    for name, path in sorted(generators.items()):
        if query is not None:
            candidates += generator_candidates(path, query, query_kind, draws, name)
    return candidates


def selection_record(selection: Selection, **context: Any) -> dict[str, Any]:
    """What ``selection.json`` holds: the winner, every candidate's held-out NLL, the folds, the times."""
    return {
        "winner": selection.winner.name,
        "winner_kind": selection.winner.kind,
        "winner_detail": dict(selection.winner.detail),
        "scores": selection.table(),
        "folds": selection.folds,
        "seconds": selection.seconds,
        "skipped": selection.skipped,
        **context,
    }


def write_selection(out_dir: str | Path, selection: Selection, **context: Any) -> dict[str, Any]:
    """Write the winner as a PEFT folder with ``selection.json`` inside (one atomic folder); returns the record."""
    record = selection_record(selection, **context)
    write_adapter(out_dir, dict(selection.winner.state), dict(selection.winner.config), {"selection.json": record})
    return record


def adapt_from_text(
    text_path: str | Path,
    library_dir: str | Path,
    out_dir: str | Path,
    cfg: SelectorConfig,
    model_cfg: ModelConfig | None = None,
    max_chars: int = DEFAULT_MAX_CHARS,
) -> dict[str, Any]:
    """A new category's adapter from its text and a serving library: the selector's choice, written to
    ``out_dir`` (PEFT folder + ``selection.json``). Every input is checked before anything is computed.

    Raises:
        ArtifactError: The library is missing or malformed (named).
        TaskVectorKindError: The library's vectors cannot be computed from text alone.
        DataError: The text is missing, unreadable, empty or shorter than the samples need (named).
    """
    started = time.perf_counter()
    library = read_library(library_dir)
    plan = plan_from_recorded(library.vector_kind, library.vector_config, Path(library_dir) / LIBRARY_FILE, model_cfg)
    if not plan.uses_text:
        raise ArtifactError(f"{library_dir}: the library's vectors are {plan.kind!r}; adapt needs text vectors")
    texts = read_text_source(text_path, max_chars)
    tokenizer = load_tokenizer(plan.model_cfg)
    try:
        blocks = sample_text_blocks(texts, tokenizer, plan.tv_cfg)
    except DataError as exc:
        raise DataError(f"{text_path}: too little text for one sample of {plan.tv_cfg.sample_tokens} tokens") from exc
    model = load_base_model(plan.model_cfg)
    loaded = time.perf_counter()
    folders = [folder for _, folder in library.stored.values()] + list(library.categories.values())
    start = min((adapter_first_layer(folder) for folder in folders), default=0)
    query = prefix_task_vector(model, blocks, start, cfg.batch_size)  # its prefix states serve the scoring too
    candidates = library_candidates(
        library.stored, library.categories, library.vectors, library.generators, query, plan.kind, cfg.draws,
        library.knn_k, library.knn_temperature,
    )  # fmt: skip
    selection = select_adapter(model, blocks, candidates, cfg, finetune_from=library.multitask)
    selection.seconds.update(load=loaded - started, total_with_load=time.perf_counter() - started)
    # selection.json travels with the adapter: no path of this machine in it. The winner's folder is named relative
    # to the library, the library and the text by name (the text's sha256 identifies its content).
    winner = selection.winner.detail.get("folder")
    if winner is not None:
        relative = Path(winner).resolve().relative_to(Path(library_dir).resolve()).as_posix()
        selection.winner = replace(selection.winner, detail={**selection.winner.detail, "folder": relative})
    return write_selection(
        out_dir, selection, text=Path(text_path).name, text_sha256=text_source_sha256(text_path),
        library=Path(library_dir).resolve().name, samples=int(blocks.shape[0]),
        sample_tokens=plan.tv_cfg.sample_tokens, task_vector_kind=plan.kind,
    )  # fmt: skip
