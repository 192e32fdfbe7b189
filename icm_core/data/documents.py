"""Reading a category's text: its documents, normalised, de-duplicated and capped; and its source fingerprint."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from icm_core.data.categories import (
    BUILTIN_PREFIX,
    Category,
)
from icm_core.data.config import DataConfig
from icm_core.data.corpora.sources import BUILTIN_SOURCES
from icm_core.data.corpora.user import hidden, user_documents
from icm_core.data.text import DataError, normalise_text
from icm_core.infra.io import sha256_file


__all__ = ["iter_documents", "read_documents", "source_fingerprint"]


def iter_documents(category: Category) -> Iterator[str]:
    """Yield a category's normalised, non-empty documents lazily, in source order (no cap, no dedup).

    Args:
        category: The category to read.

    Yields:
        Documents with normalised whitespace.

    Raises:
        DataError: The source is missing or unreadable (see :func:`read_documents`).
    """
    if category.is_builtin:
        spec = BUILTIN_SOURCES[category.source[len(BUILTIN_PREFIX) :]]
        raw: Iterable[str] = spec.documents()
        prose = spec.prose
    else:
        raw = user_documents(category.name, category.source, category.format, category.jsonl_field)
        prose = False
    for doc in raw:
        doc = normalise_text(doc, prose=prose)
        if doc:
            yield doc


def _truncate(text: str, limit: int) -> str:
    """Cut ``text`` to at most ``limit`` characters, preferring a whitespace boundary near the end."""
    if len(text) <= limit:
        return text
    cut = text[:limit]
    space = max(cut.rfind("\n"), cut.rfind(" "))
    if space >= limit - 200 and space > 0:
        cut = cut[:space]
    return cut.rstrip()


def read_documents(category: Category, cfg: DataConfig) -> list[str]:
    """Read a category's documents, normalised, de-duplicated and capped at ``cfg.max_chars`` characters.

    Whole documents are kept while they fit; the first one that does not fit is truncated to the
    remaining budget and reading stops (large sources are only read as far as needed).

    Args:
        category: The category to read.
        cfg: Data settings (``max_chars``, ``min_chars``).

    Returns:
        The documents, in source order.

    Raises:
        DataError: The source is missing, not UTF-8 (names the file and byte offset), malformed JSONL
            (names the file and line), empty, or has fewer than ``cfg.min_chars`` characters.
    """
    docs: list[str] = []
    seen: set[str] = set()
    total = 0
    for doc in iter_documents(category):
        if doc in seen:
            continue
        remaining = cfg.max_chars - total
        if len(doc) > remaining:
            doc = _truncate(doc, remaining)
            if doc and doc not in seen:
                docs.append(doc)
                total += len(doc)
            break
        seen.add(doc)
        docs.append(doc)
        total += len(doc)
        if total >= cfg.max_chars:
            break
    if total == 0:
        raise DataError(f"category {category.name!r}: source {category.source} is empty (no non-whitespace text)")
    if total < cfg.min_chars:
        raise DataError(
            f"category {category.name!r} has only {total} characters, need at least {cfg.min_chars} "
            f"(source {category.source})"
        )
    return docs


def source_fingerprint(category: Category) -> str:
    """sha256 identifying a category's source text, for cache keys.

    User sources hash their files' bytes (so editing a file invalidates cached stages); built-in
    sources hash the versions of what ships them (the Python stdlib and gensim, and for Debian
    sources the fetched packages' versions and ``.deb`` sha256s).
    """
    import hashlib
    import importlib.metadata
    import sys

    digest = hashlib.sha256(category.source.encode())
    if category.is_builtin:
        digest.update(sys.version.encode())
        digest.update(importlib.metadata.version("gensim").encode())
        source = BUILTIN_SOURCES[category.source[len(BUILTIN_PREFIX) :]]
        if source.debian_packages:  # the demo's sources have none: their fingerprints stay as they were
            from icm_core.data.corpora.debian import debian_root, package_record

            for package in source.debian_packages:
                record = package_record(package)
                if record is None:
                    raise DataError(
                        f"category {category.name!r}: Debian package {package!r} is not under {debian_root()}; "
                        "run `make corpora`"
                    )
                digest.update(f"{package}={record.get('version')}:{record.get('deb_sha256')}".encode())
        return digest.hexdigest()
    path = Path(category.source).expanduser()
    files = sorted(p for p in path.rglob("*") if p.is_file() and not hidden(p, path)) if path.is_dir() else [path]
    for file in files:
        if not file.is_file():
            raise DataError(f"category {category.name!r}: source {file} does not exist")
        digest.update(file.name.encode())
        digest.update(sha256_file(file).encode())
    return digest.hexdigest()
