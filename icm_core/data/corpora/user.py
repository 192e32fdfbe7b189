"""A user's own text: a ``.txt`` file (documents separated by blank lines), a ``.jsonl`` file (one JSON
object per line) or a folder of ``.txt`` / ``.jsonl`` files."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from icm_core.data.text import DataError, read_utf8


__all__ = ["hidden", "user_documents", "user_files"]


def _text_file_documents(path: Path) -> Iterator[str]:
    text = read_utf8(path).replace("\r\n", "\n").replace("\r", "\n")
    for chunk in re.split(r"\n[ \t]*\n", text):
        if chunk.strip():
            yield chunk


def _jsonl_file_documents(path: Path, field: str) -> Iterator[str]:
    text = read_utf8(path)
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {number}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
        if not isinstance(record, dict):
            raise DataError(f"{path}: line {number}: expected a JSON object, got {type(record).__name__}")
        if field not in record:
            raise DataError(f"{path}: line {number}: missing field {field!r} (set jsonl_field to the text field)")
        value = record[field]
        if not isinstance(value, str):
            raise DataError(f"{path}: line {number}: field {field!r} is {type(value).__name__}, expected a string")
        if value.strip():
            yield value


def user_documents(
    name: str, source: str, fmt: Literal["auto", "text", "jsonl"] = "auto", jsonl_field: str = "text"
) -> Iterator[str]:
    """Documents of a user source, in file order (errors name the category ``name`` and the file).

    Args:
        name: The category's name (for error messages).
        source: A ``.txt`` / ``.jsonl`` file or a folder of ``.txt`` (or, with ``fmt='jsonl'``, ``.jsonl``) files.
        fmt: ``auto`` picks by extension (``.jsonl`` / ``.ndjson`` -> jsonl, else text).
        jsonl_field: The field holding the text in each JSONL object.

    Raises:
        DataError: The source is missing, not UTF-8 or malformed; the message names the file (and line).
    """
    path = Path(source).expanduser()
    if path.is_dir():
        files = user_files(path, fmt)
        if not files:
            kind = ".jsonl" if fmt == "jsonl" else ".txt"
            raise DataError(f"category {name!r}: folder {path} holds no {kind} files")
        for file in files:
            if fmt == "jsonl":
                yield from _jsonl_file_documents(file, jsonl_field)
            else:
                text = read_utf8(file)
                if text.strip():
                    yield text
        return
    if not path.exists():
        raise DataError(f"category {name!r}: source {path} does not exist")
    if fmt == "auto":
        fmt = "jsonl" if path.suffix.lower() in (".jsonl", ".ndjson") else "text"
    if fmt == "jsonl":
        yield from _jsonl_file_documents(path, jsonl_field)
    else:
        yield from _text_file_documents(path)


def user_files(folder: Path, fmt: str) -> list[Path]:
    """The text files a folder source reads, sorted (hidden files and folders skipped)."""
    pattern = "*.jsonl" if fmt == "jsonl" else "*.txt"
    return sorted(p for p in folder.rglob(pattern) if p.is_file() and not hidden(p, folder))


def hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)
