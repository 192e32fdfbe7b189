"""Deterministic train / validation / test splits of a category's documents, stored with sha256 checks.

:func:`split_documents` splits documents into disjoint parts by character share; :func:`write_splits`
/ :func:`read_splits` store them as JSONL files plus a ``splits.json`` index.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from icm_core.data.config import DataConfig
from icm_core.data.text import DataError
from icm_core.infra.io import ArtifactError, read_json, sha256_file, sha256_text, write_json, write_text


__all__ = ["SPLIT_NAMES", "CategorySplits", "read_split", "read_splits", "split_documents", "write_splits"]

SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")
"""Split names, in the order they are written to ``splits.json``."""


@dataclass(frozen=True)
class CategorySplits:
    """A category's documents split into disjoint train / validation / test lists."""

    train: list[str]
    val: list[str]
    test: list[str]

    def as_dict(self) -> dict[str, list[str]]:
        """The splits keyed by name (``train``, ``val``, ``test``)."""
        return {"train": self.train, "val": self.val, "test": self.test}

    def stats(self) -> dict[str, dict[str, int]]:
        """Per split: ``{"documents": n, "chars": c}``."""
        return {name: {"documents": len(docs), "chars": sum(map(len, docs))} for name, docs in self.as_dict().items()}


_SEPARATORS = (re.compile(r"\n[ \t]*\n"), re.compile(r"\n"), re.compile(r"[ \t]+"))


def _units(text: str, start: int, end: int, max_len: int, level: int = 0) -> list[tuple[int, int]]:
    """Contiguous spans tiling ``text[start:end]``, each at most ``max_len`` long, cut at the coarsest
    separator possible: paragraphs, then lines, then spaces, then anywhere."""
    if end - start <= max_len:
        return [(start, end)]
    if level >= len(_SEPARATORS):
        return [(i, min(i + max_len, end)) for i in range(start, end, max_len)]
    cuts = [m.end() for m in _SEPARATORS[level].finditer(text, start, end)]
    bounds = [start] + [c for c in cuts if start < c < end] + [end]
    spans: list[tuple[int, int]] = []
    for a, b in zip(bounds, bounds[1:], strict=False):
        spans.extend(_units(text, a, b, max_len, level + 1))
    return spans


def _chunk_spans(text: str, max_len: int) -> list[tuple[int, int]]:
    """Greedily merge :func:`_units` into contiguous spans of at most ``max_len`` characters."""
    pieces: list[tuple[int, int]] = []
    for a, b in _units(text, 0, len(text), max_len):
        if pieces and b - pieces[-1][0] <= max_len:
            pieces[-1] = (pieces[-1][0], b)
        else:
            pieces.append((a, b))
    return pieces


def _assign(lengths: Sequence[int], cfg: DataConfig) -> list[str]:
    """Split name per item: an item goes where the midpoint of its cumulative character range falls
    (test first, then val, then train)."""
    total = sum(lengths)
    test_end = cfg.test_fraction * total
    val_end = (cfg.test_fraction + cfg.val_fraction) * total
    names, position = [], 0
    for length in lengths:
        middle = position + length / 2
        names.append("test" if middle < test_end else "val" if middle < val_end else "train")
        position += length
    return names


def _shares_ok(names: Sequence[str], lengths: Sequence[int], cfg: DataConfig) -> bool:
    total = sum(lengths) or 1
    chars = {name: 0 for name in SPLIT_NAMES}
    for name, length in zip(names, lengths, strict=True):
        chars[name] += length
    if any(chars[name] == 0 for name in SPLIT_NAMES):
        return False
    for name, target in (("test", cfg.test_fraction), ("val", cfg.val_fraction)):
        if abs(chars[name] / total - target) > 0.5 * target:
            return False
    return True


def split_documents(docs: Sequence[str], cfg: DataConfig) -> CategorySplits:
    """Split documents deterministically into disjoint, non-empty train / val / test lists.

    The document order is shuffled with ``random.Random(cfg.split_seed)``; walking that order, the
    first ~``test_fraction`` of the characters go to test, the next ~``val_fraction`` to val and the
    rest to train (each document goes where the middle of its character range falls). When that
    leaves a split empty or far from its share (a few huge documents), long documents are cut at
    paragraph, then line, then word boundaries into pieces no longer than a quarter of the smallest
    split's share and the walk is repeated; consecutive pieces of one document that land in the same
    split are joined again, so only documents straddling a split boundary end up divided.

    Args:
        docs: Documents (e.g. from :func:`read_documents`). Exact duplicates and blank ones are dropped.
        cfg: Data settings (``test_fraction``, ``val_fraction``, ``split_seed``).

    Returns:
        The splits; within each split documents keep the shuffled order.

    Raises:
        DataError: There is no text, or too little to give every split something.
    """
    unique = list(dict.fromkeys(d for d in docs if d.strip()))
    if not unique:
        raise DataError("cannot split: no non-empty documents")
    order = list(range(len(unique)))
    random.Random(cfg.split_seed).shuffle(order)
    shuffled = [unique[i] for i in order]

    lengths = [len(d) for d in shuffled]
    names = _assign(lengths, cfg)
    if _shares_ok(names, lengths, cfg):
        parts: dict[str, list[str]] = {name: [] for name in SPLIT_NAMES}
        for name, doc in zip(names, shuffled, strict=True):
            parts[name].append(doc)
    else:
        parts = _split_with_chunks(shuffled, cfg)

    # No text in two splits: test wins over val, val over train.
    taken: set[str] = set()
    for name in ("test", "val", "train"):
        kept = []
        for doc in parts[name]:
            if doc not in taken:
                taken.add(doc)
                kept.append(doc)
        parts[name] = kept
    empty = [name for name in SPLIT_NAMES if not parts[name]]
    if empty:
        total = sum(lengths)
        raise DataError(f"cannot split {total} characters into non-empty train/val/test (empty: {', '.join(empty)})")
    return CategorySplits(train=parts["train"], val=parts["val"], test=parts["test"])


def _split_with_chunks(shuffled: list[str], cfg: DataConfig) -> dict[str, list[str]]:
    total = sum(len(d) for d in shuffled)
    train_fraction = 1.0 - cfg.test_fraction - cfg.val_fraction
    max_len = max(1, int(min(cfg.test_fraction, cfg.val_fraction, train_fraction) * total / 4))
    items: list[tuple[int, int, int]] = []  # (document index, start, end)
    for index, doc in enumerate(shuffled):
        spans = _chunk_spans(doc, max_len) if len(doc) > max_len else [(0, len(doc))]
        items.extend((index, a, b) for a, b in spans)
    names = _assign([b - a for _, a, b in items], cfg)
    parts: dict[str, list[str]] = {name: [] for name in SPLIT_NAMES}
    group: tuple[str, int, int, int] | None = None  # (split, document, start, end) being merged

    def flush() -> None:
        if group is not None:
            text = shuffled[group[1]][group[2] : group[3]].strip()
            if text:
                parts[group[0]].append(text)

    for name, (index, a, b) in zip(names, items, strict=True):
        if group is not None and group[0] == name and group[1] == index:
            group = (name, index, group[2], b)
        else:
            flush()
            group = (name, index, a, b)
    flush()
    return parts


_SPLIT_FORMAT_VERSION = 1


def write_splits(splits: CategorySplits, folder: str | Path) -> dict[str, Any]:
    """Write ``train.jsonl``, ``val.jsonl``, ``test.jsonl`` and ``splits.json`` into ``folder``, atomically.

    Each JSONL file holds one ``{"text": ...}`` object per document. ``splits.json`` (written last, so
    its presence means the split files are complete) records per split the file name, document count,
    character count and the file's sha256.

    Args:
        splits: The splits to store.
        folder: Destination folder (created if missing).

    Returns:
        The ``splits.json`` payload: ``{"format_version": 1, "splits": {name: {"file", "documents",
        "chars", "sha256"}}}``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"format_version": _SPLIT_FORMAT_VERSION, "splits": {}}
    for name, docs in splits.as_dict().items():
        text = "".join(json.dumps({"text": doc}, ensure_ascii=False) + "\n" for doc in docs)
        write_text(folder / f"{name}.jsonl", text)
        summary["splits"][name] = {
            "file": f"{name}.jsonl",
            "documents": len(docs),
            "chars": sum(len(doc) for doc in docs),
            "sha256": sha256_text(text),
        }
    write_json(folder / "splits.json", summary)
    return summary


def read_split(folder: str | Path, name: str) -> list[str]:
    """Read one split (``train``, ``val`` or ``test``) written by :func:`write_splits`, verifying its sha256 and
    count; the other splits' files are not opened (a stage that may read only the train text uses this).

    Raises:
        ArtifactError: ``splits.json`` or the split file is missing, corrupted (sha256 mismatch) or inconsistent;
            the message names the file.
        ValueError: ``name`` is not a split name.
    """
    if name not in SPLIT_NAMES:
        raise ValueError(f"split {name!r}: not one of {', '.join(SPLIT_NAMES)}")
    folder = Path(folder)
    summary = read_json(folder / "splits.json")
    entries = summary.get("splits") if isinstance(summary, dict) else None
    if not isinstance(entries, dict) or set(entries) != set(SPLIT_NAMES):
        raise ArtifactError(f"{folder / 'splits.json'}: expected entries for {', '.join(SPLIT_NAMES)}")
    entry = entries[name]
    path = folder / entry.get("file", f"{name}.jsonl")
    if not path.is_file():
        raise ArtifactError(f"{path}: split file not found")
    actual = sha256_file(path)
    if actual != entry.get("sha256"):
        raise ArtifactError(
            f"{path}: sha256 mismatch (expected {entry.get('sha256')}, found {actual}); the split file is "
            "corrupted or was edited; re-run the data stage"
        )
    docs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            docs.append(json.loads(line)["text"])
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ArtifactError(f'{path}: line {number}: not a {{"text": ...}} JSON object') from exc
    if len(docs) != entry.get("documents"):
        raise ArtifactError(f"{path}: holds {len(docs)} documents, splits.json says {entry.get('documents')}")
    return docs


def read_splits(folder: str | Path) -> CategorySplits:
    """Read splits written by :func:`write_splits`, verifying every file's sha256 and counts.

    Args:
        folder: The folder holding ``splits.json`` and the three JSONL files.

    Returns:
        The splits.

    Raises:
        ArtifactError: ``splits.json`` or a split file is missing, corrupted (sha256 mismatch) or
            inconsistent; the message names the file.
    """
    parts = {name: read_split(folder, name) for name in SPLIT_NAMES}
    return CategorySplits(train=parts["train"], val=parts["val"], test=parts["test"])
