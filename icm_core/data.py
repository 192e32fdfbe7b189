"""Reading a category's text: its documents, normalised, de-duplicated and capped; and its source fingerprint.

The concerns that used to live here have their own modules; their names are re-exported so existing
imports keep working:

* :mod:`icm_core.categories` -- the category model, category files, the demo set and the library;
* :mod:`icm_core.corpora`    -- the built-in text sources, one module per source family;
* :mod:`icm_core.splits`     -- deterministic train / val / test splits and their files;
* :mod:`icm_core.tokens`     -- token blocks;
* :mod:`icm_core.text`       -- ``DataError`` and whitespace normalisation.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from icm_core.categories import (
    BUILTIN_PREFIX,
    Category,
    builtin_categories,
    category_family,
    library_categories,
    load_category_file,
)
from icm_core.config import DataConfig
from icm_core.corpora import BUILTIN_SOURCES, DEMO_SOURCES, FAMILIES
from icm_core.corpora.mediawiki import strip_wiki_markup
from icm_core.corpora.user import hidden, user_documents
from icm_core.io import sha256_file
from icm_core.splits import SPLIT_NAMES, CategorySplits, read_splits, split_documents, write_splits
from icm_core.text import DataError, normalise_text
from icm_core.tokens import sample_blocks, token_blocks


__all__ = [
    "BUILTIN_PREFIX",
    "BUILTIN_SOURCES",
    "DEMO_SOURCES",
    "FAMILIES",
    "SPLIT_NAMES",
    "Category",
    "CategorySplits",
    "DataError",
    "builtin_categories",
    "category_family",
    "iter_documents",
    "library_categories",
    "load_category_file",
    "normalise_text",
    "read_documents",
    "read_splits",
    "sample_blocks",
    "source_fingerprint",
    "split_documents",
    "strip_wiki_markup",
    "token_blocks",
    "write_splits",
]


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
            from icm_core.corpora.debian import debian_root, package_record

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
