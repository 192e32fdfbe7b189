"""Task categories and their text: built-in demo corpora, user files, splits and token blocks.

A *category* is one task of ICM-LoRA: a name, a one-line description and a text source. The
source is either one of the built-in demo corpora (real text that installed packages ship, so the
demo needs no downloads) or a user file / folder:

* ``builtin:wikipedia``   -- English Wikipedia articles (gensim's test dump, wiki markup stripped);
* ``builtin:news``        -- ABC news articles (gensim's Lee background corpus);
* ``builtin:reviews``     -- movie reviews (gensim's Pang & Lee polarity sentences and IMDB reviews);
* ``builtin:python-code`` -- Python standard library modules of the running interpreter;
* ``builtin:python-docs`` -- prose of the Python reference / library docs (``pydoc_data.topics``);
* a ``.txt`` file (documents separated by blank lines), a ``.jsonl`` file (one JSON object per
  line, text under ``jsonl_field``) or a folder of ``.txt`` files (one document per file).

:func:`read_documents` turns a category into a list of documents (capped at
``DataConfig.max_chars``), :func:`split_documents` splits them deterministically into disjoint
train / val / test parts, :func:`write_splits` / :func:`read_splits` store them with sha256
checks, and :func:`token_blocks` / :func:`sample_blocks` cut text into fixed-length token blocks.
"""

from __future__ import annotations

import ast
import bz2
import html
import json
import random
import re
import sysconfig
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from icm_core.config import DataConfig, validate_category_name
from icm_core.io import ArtifactError, package_folder, read_json, sha256_file, sha256_text, write_json, write_text


if TYPE_CHECKING:  # torch is imported lazily: reading and splitting text does not need it
    import torch


__all__ = [
    "BUILTIN_PREFIX",
    "BUILTIN_SOURCES",
    "Category",
    "CategorySplits",
    "DataError",
    "builtin_categories",
    "iter_documents",
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


class DataError(ValueError):
    """Category text is missing, unreadable, malformed or too small. The message names the file or category."""


BUILTIN_PREFIX = "builtin:"
SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")
"""Split names, in the order they are written to ``splits.json``."""


# --------------------------------------------------------------------------------------------------
# Categories
# --------------------------------------------------------------------------------------------------


class Category(BaseModel):
    """One task category: a name, a one-line description and where its text comes from."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(
        description="Category name; it becomes a folder name and an artifact key: 1-64 lowercase letters, "
        "digits, '-' or '_'."
    )
    description: str = Field(
        description="One-line description of the category's text (non-empty, at most 300 characters)."
    )
    source: str = Field(
        description="'builtin:<id>' for a built-in demo corpus (wikipedia, news, reviews, python-code, "
        "python-docs), or a path to a .txt file (documents separated by blank lines), a .jsonl file "
        "(one JSON object per line) or a folder of .txt files (one document per file)."
    )
    format: Literal["auto", "text", "jsonl"] = Field(
        "auto",
        description="How to read a user source: 'auto' picks by extension ('.jsonl' -> jsonl, else text); "
        "ignored for built-in sources.",
    )
    jsonl_field: str = Field("text", min_length=1, description="Field holding the text in each JSONL object.")

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        return validate_category_name(value)

    @field_validator("description")
    @classmethod
    def _one_line(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("description must not be empty")
        if "\n" in value or "\r" in value:
            raise ValueError("description must be a single line")
        if len(value) > 300:
            raise ValueError(f"description is {len(value)} characters long; at most 300 allowed")
        return value

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("source must not be empty")
        if value.startswith(BUILTIN_PREFIX):
            key = value[len(BUILTIN_PREFIX) :]
            if key not in BUILTIN_SOURCES:
                raise ValueError(
                    f"unknown built-in source {value!r}; choose one of "
                    + ", ".join(BUILTIN_PREFIX + k for k in BUILTIN_SOURCES)
                )
        return value

    @property
    def is_builtin(self) -> bool:
        """Whether the source is a built-in demo corpus."""
        return self.source.startswith(BUILTIN_PREFIX)


def builtin_categories() -> list[Category]:
    """The five built-in demo categories, one per built-in source.

    Returns:
        Categories named ``wikipedia``, ``news``, ``reviews``, ``python-code`` and ``python-docs``.
    """
    return [
        Category(name=key, description=spec.description, source=BUILTIN_PREFIX + key)
        for key, spec in BUILTIN_SOURCES.items()
    ]


def load_category_file(path: str | Path) -> list[Category]:
    """Read categories from a YAML or JSON file with a top-level ``categories:`` list.

    Relative ``source`` paths are resolved against the file's folder (``builtin:`` sources are kept).

    Args:
        path: A ``.yaml`` / ``.yml`` / ``.json`` file.

    Returns:
        The categories, in file order.

    Raises:
        DataError: The file is missing or malformed, a category is invalid (the message names the
            file, the entry and the offending field), or two categories share a name.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: category file not found")
    raw = _decode(path.read_bytes(), path)
    try:
        payload = json.loads(raw) if path.suffix.lower() == ".json" else yaml.safe_load(raw)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise DataError(f"{path}: cannot parse category file ({exc})") from exc
    if not isinstance(payload, dict) or "categories" not in payload:
        raise DataError(f"{path}: expected a mapping with a top-level 'categories:' list")
    extra = sorted(set(payload) - {"categories"})
    if extra:
        raise DataError(f"{path}: unknown top-level field(s) {', '.join(map(repr, extra))}; only 'categories' allowed")
    entries = payload["categories"]
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{path}: 'categories' must be a non-empty list")

    categories: list[Category] = []
    seen: dict[str, int] = {}
    for index, entry in enumerate(entries):
        where = f"{path}: categories[{index}]"
        if not isinstance(entry, dict):
            raise DataError(f"{where}: expected a mapping, got {type(entry).__name__}")
        entry = dict(entry)
        source = entry.get("source")
        if isinstance(source, str) and source.strip() and not source.strip().startswith(BUILTIN_PREFIX):
            source_path = Path(source.strip()).expanduser()
            if not source_path.is_absolute():
                source_path = path.parent.absolute() / source_path
            entry["source"] = str(source_path)
        try:
            category = Category.model_validate(entry)
        except ValidationError as exc:
            raise DataError(f"{where}: {_format_validation_error(exc)}") from exc
        if category.name in seen:
            raise DataError(
                f"{where}: duplicate category name {category.name!r} (also categories[{seen[category.name]}])"
            )
        seen[category.name] = index
        categories.append(category)
    return categories


def _format_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ())) or "entry"
        msg = err.get("msg", "invalid")
        if err.get("type") == "extra_forbidden":
            msg = f"unknown field {loc!r}"
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------------
# Text normalisation
# --------------------------------------------------------------------------------------------------

_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b\ufeff]")
_TRAILING_WS_RE = re.compile(r"[ \t\u00a0]+$", re.MULTILINE)
_BLANK_RUN_RE = re.compile(r"\n{3,}")
_INLINE_WS_RE = re.compile(r"[ \t\u00a0\u2009\u202f]+")
_SPACE_BEFORE_PUNCT_RE = re.compile(r"[ \t]+([,.;:!?])(?=\s|$)")


def normalise_text(text: str, prose: bool = False) -> str:
    """Normalise whitespace without destroying structure.

    Line endings become ``\\n``, control characters are dropped, trailing spaces are removed, runs of
    blank lines collapse to one blank line and the text is stripped. Indentation is kept (code needs
    it) unless ``prose`` is set, which also collapses runs of spaces / tabs within lines and removes
    spaces before punctuation (``"word ,"`` -> ``"word,"``).

    Args:
        text: Raw text.
        prose: Also collapse inline whitespace (for natural-language text).

    Returns:
        The normalised text (possibly empty).
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL_RE.sub("", text)
    if prose:
        text = _INLINE_WS_RE.sub(" ", text)
        text = _SPACE_BEFORE_PUNCT_RE.sub(r"\1", text)
        text = re.sub(r"^ +", "", text, flags=re.MULTILINE)
    text = _TRAILING_WS_RE.sub("", text)
    text = _BLANK_RUN_RE.sub("\n\n", text)
    return text.strip()


# --------------------------------------------------------------------------------------------------
# Built-in sources
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _BuiltinSource:
    description: str
    documents: Callable[[], Iterator[str]]
    prose: bool


def _package_folder(package: str) -> Path:
    """Folder of an installed package, found without importing it."""
    folder = package_folder(package)
    if folder is None:
        raise DataError(
            f"the built-in text needs the {package!r} package, which is not installed; "
            f"install it with `pip install {package}`"
        )
    return folder


def _package_file(package: str, relative: str) -> Path:
    path = _package_folder(package) / relative
    if not path.is_file():
        raise DataError(
            f"{path}: file missing from the installed {package!r} package; reinstall it with "
            f"`pip install --force-reinstall {package}`"
        )
    return path


def _read_utf8(path: Path) -> str:
    return _decode(path.read_bytes(), path)


def _decode(data: bytes, path: Path) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}: not valid UTF-8 at byte offset {exc.start} (byte 0x{data[exc.start]:02x}); "
            "convert the file to UTF-8"
        ) from exc
    return text.removeprefix("\ufeff")


# --- Wikipedia -------------------------------------------------------------------------------------

_WIKI_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_WIKI_MIN_CHARS = 300
"""Articles shorter than this after stripping (stubs, lists of links) are skipped."""
_WIKI_MAX_ARTICLE_CHARS = 12_000
"""Articles are cut (at a paragraph break) to this length, so a demo-sized budget spans many articles."""
_WIKI_TAIL_SECTIONS = (
    "references",
    "notes",
    "see also",
    "external links",
    "further reading",
    "bibliography",
    "sources",
    "citations",
    "footnotes",
    "notes and references",
    "references and notes",
    "works cited",
)
_WIKI_TAIL_RE = re.compile(
    r"^==+\s*(?:" + "|".join(re.escape(s) for s in _WIKI_TAIL_SECTIONS) + r")\s*==+\s*$",
    re.IGNORECASE | re.MULTILINE,
)
_WIKI_DROP_LINK_NS = {"file", "image", "media", "category"}
_WIKI_INTERWIKI_RE = re.compile(r"^:?[a-z]{2,3}(?:-[a-z]{2,8})?:")
_WIKI_DROP_TAGS = (
    "gallery|timeline|imagemap|references|score|math|chem|ce|hiero|graph|mapframe|syntaxhighlight|source|"
    "templatedata|inputbox|categorytree"
)


def _remove_nested(text: str, opener: str, closer: str) -> str:
    """Remove balanced ``opener ... closer`` spans (nested ones included) from ``text``."""
    if opener not in text:
        return text
    out: list[str] = []
    depth = 0
    i = 0
    start = 0  # where the outermost open span began
    n = len(text)
    while i < n:
        if text.startswith(opener, i):
            if depth == 0:
                start = i
            depth += 1
            i += len(opener)
        elif depth and text.startswith(closer, i):
            depth -= 1
            i += len(closer)
        else:
            if depth == 0:
                out.append(text[i])
            i += 1
    if depth:  # unbalanced: keep what follows the unclosed opener, minus the markers
        out.append(text[start:].replace(opener, " ").replace(closer, " "))
    return "".join(out)


def _split_top_level(text: str, sep: str = "|") -> list[str]:
    """Split on ``sep`` outside nested ``[[ ]]`` links."""
    parts, depth, current, i = [], 0, [], 0
    while i < len(text):
        if text.startswith("[[", i):
            depth += 1
            current.append("[[")
            i += 2
        elif text.startswith("]]", i) and depth:
            depth -= 1
            current.append("]]")
            i += 2
        elif text[i] == sep and depth == 0:
            parts.append("".join(current))
            current = []
            i += 1
        else:
            current.append(text[i])
            i += 1
    parts.append("".join(current))
    return parts


def _render_link(inner: str) -> str:
    """Text shown for ``[[inner]]``: the label (or target); '' for file / category / interwiki links."""
    parts = _split_top_level(inner)
    target = parts[0].strip()
    namespace = target.lstrip(":").split(":", 1)[0].strip().lower() if ":" in target else ""
    if namespace in _WIKI_DROP_LINK_NS:
        return ""
    if len(parts) == 1:
        if _WIKI_INTERWIKI_RE.match(target) and not target.startswith(":"):
            return ""  # interlanguage link such as [[de:Anarchismus]]
        label = target.lstrip(":")
        if namespace and namespace not in ("",):
            label = label.split(":", 1)[1] if ":" in label else label
    else:
        label = parts[-1].strip() or target.lstrip(":")
    return _replace_links(label)


def _replace_links(text: str) -> str:
    """Replace every ``[[...]]`` (nested ones included) by its rendered text."""
    if "[[" not in text:
        return text
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        if text.startswith("[[", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("[[", j):
                    depth += 1
                    j += 2
                elif text.startswith("]]", j):
                    depth -= 1
                    j += 2
                else:
                    j += 1
            if depth:  # unclosed link: drop the brackets, keep the text
                out.append(text[i + 2 :])
                break
            out.append(_render_link(text[i + 2 : j - 2]))
            i = j
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def strip_wiki_markup(wikitext: str) -> str:
    """Turn MediaWiki markup into plain text.

    Removes HTML comments, ``<ref>`` citations, templates ``{{...}}`` (nested too), tables
    ``{|...|}``, file / image / category / interlanguage links, bold and italic quotes, magic words
    and HTML tags; ``[[target|label]]`` becomes ``label``, ``[http://url label]`` becomes ``label``,
    headings ``== x ==`` become ``x``, list markers are dropped, and trailing sections that are only
    lists of references ("References", "External links", "See also", ...) are cut off.

    Args:
        wikitext: Raw wikitext (already XML-unescaped).

    Returns:
        Plain text with normalised whitespace.
    """
    text = re.sub(r"<!--.*?(?:-->|$)", "", wikitext, flags=re.DOTALL)
    tail = _WIKI_TAIL_RE.search(text)
    if tail:
        text = text[: tail.start()]
    text = re.sub(r"<ref\b[^>]*/\s*>", "", text, flags=re.IGNORECASE)
    text = re.sub(r"<ref\b[^>]*>.*?(?:</ref\s*>|$)", "", text, flags=re.IGNORECASE | re.DOTALL)
    text = re.sub(rf"<({_WIKI_DROP_TAGS})\b[^>]*?(?:/>|>.*?</\1\s*>)", "", text, flags=re.IGNORECASE | re.DOTALL)
    text = _remove_nested(text, "{{", "}}")
    text = _remove_nested(text, "{|", "|}")
    text = re.sub(r"<br\s*/?>", "\n", text, flags=re.IGNORECASE)
    text = re.sub(r"</?[a-zA-Z][^>]*>", "", text)
    text = _replace_links(text)
    text = re.sub(r"\[(?:https?:|ftp:)?//[^\s\]]+\s*([^\]]*)\]", r"\1", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"__[A-Z]+__", "", text)
    text = re.sub(r"^(=+)\s*(.*?)\s*\1\s*$", "\n\\2", text, flags=re.MULTILINE)
    text = re.sub(r"^[*#:;]+\s*", "", text, flags=re.MULTILINE)
    text = re.sub(r"^-{4,}\s*$", "", text, flags=re.MULTILINE)
    # Residue of removed templates / tables: lines of bare markup, and empty brackets.
    text = re.sub(r"^\s*(?:[|!]|\}\}|\{\{|\|\}).*$", "", text, flags=re.MULTILINE)
    text = html.unescape(text).replace("\u00a0", " ")
    # Brackets emptied by removed templates: "(; born 1809)" -> "(born 1809)", "(, )" -> "".
    text = re.sub(r"\(\s*(?:[,;:]\s*)+", "(", text)
    text = re.sub(r"(?:\s*[,;:])+\s*\)", ")", text)
    text = re.sub(r"\s*\(\s*\)", "", text)
    return normalise_text(text, prose=True)


def _wikipedia_documents() -> Iterator[str]:
    path = _package_file("gensim", _WIKI_FILE)
    with bz2.open(path, "rb") as handle:
        for _event, elem in ET.iterparse(handle, events=("end",)):
            if elem.tag.rsplit("}", 1)[-1] != "page":
                continue
            fields: dict[str, Any] = {}
            for child in elem.iter():
                tag = child.tag.rsplit("}", 1)[-1]
                if tag in ("title", "ns", "text") and tag not in fields:
                    fields[tag] = child.text or ""
                elif tag == "redirect":
                    fields["redirect"] = True
            elem.clear()
            raw = fields.get("text", "")
            if fields.get("redirect") or fields.get("ns", "0").strip() != "0":
                continue
            if re.match(r"\s*#redirect", raw, re.IGNORECASE):
                continue
            if re.search(r"\{\{\s*(?:disambiguation|disambig|dab|hndis|geodis)\b", raw, re.IGNORECASE):
                continue
            text = strip_wiki_markup(raw)
            if len(text) < _WIKI_MIN_CHARS:
                continue
            if len(text) > _WIKI_MAX_ARTICLE_CHARS:  # keep the lead and first sections: more articles fit
                cut = text.rfind("\n\n", 0, _WIKI_MAX_ARTICLE_CHARS)
                text = text[: cut if cut > _WIKI_MAX_ARTICLE_CHARS // 2 else _WIKI_MAX_ARTICLE_CHARS].rstrip()
            title = (fields.get("title") or "").strip()
            yield f"{title}\n\n{text}" if title else text


# --- News and reviews ------------------------------------------------------------------------------


def _read_builtin_text(path: Path) -> str:
    """Read a bundled corpus file: UTF-8, or Windows-1252 for the few older files shipped that way."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")


def _lines(path: Path) -> Iterator[str]:
    for line in _read_builtin_text(path).splitlines():
        if line.strip():
            yield line


def _news_documents() -> Iterator[str]:
    yield from _lines(_package_file("gensim", "test/test_data/lee_background.cor"))


_REVIEW_GROUP = 10


def _reviews_documents() -> Iterator[str]:
    polarity = _package_file("gensim", "test/test_data/pang_lee_polarity.cor")
    imdb = _package_file("gensim", "test/test_data/alldata-id-10.txt")
    sentences = [re.sub(r"^__label__\S+\s*", "", line).strip() for line in _lines(polarity)]
    sentences = [s for s in sentences if s]
    for start in range(0, len(sentences), _REVIEW_GROUP):
        yield "\n".join(sentences[start : start + _REVIEW_GROUP])
    for line in _lines(imdb):
        review = re.sub(r"^_\*\d+\s+", "", line).strip()
        if review:
            yield review


# --- Python ----------------------------------------------------------------------------------------

_STDLIB_SKIP = {"test", "idlelib", "site-packages", "__pycache__", "this.py", "antigravity.py"}


def _stdlib_folder() -> Path:
    folder = Path(sysconfig.get_paths()["stdlib"])
    if not folder.is_dir():
        raise DataError(f"{folder}: the Python standard library folder of this interpreter was not found")
    return folder


def _python_code_documents() -> Iterator[str]:
    folder = _stdlib_folder()
    files = sorted(
        p for p in folder.glob("*.py") if p.is_file() and p.name not in _STDLIB_SKIP and not p.name.startswith("_")
    )
    if not files:
        raise DataError(f"{folder}: no Python modules found in the standard library folder")
    for path in files:  # a generator: read_documents stops reading once max_chars is reached
        try:
            yield _read_utf8(path)
        except DataError:
            continue  # a stdlib module in another encoding is simply skipped


def _python_docs_documents() -> Iterator[str]:
    path = _stdlib_folder() / "pydoc_data" / "topics.py"
    if not path.is_file():
        raise DataError(f"{path}: pydoc_data/topics.py is missing from this Python installation")
    tree = ast.parse(_read_utf8(path), filename=str(path))
    topics: Any = None
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign):
            targets = [node.target]
        else:
            continue
        if any(isinstance(t, ast.Name) and t.id == "topics" for t in targets) and node.value is not None:
            topics = ast.literal_eval(node.value)
    if not isinstance(topics, dict) or not topics:
        raise DataError(f"{path}: no 'topics = {{...}}' dictionary literal found")
    for _name, body in topics.items():
        if isinstance(body, str) and body.strip():
            yield body


BUILTIN_SOURCES: dict[str, _BuiltinSource] = {
    "wikipedia": _BuiltinSource("Encyclopedia articles from English Wikipedia", _wikipedia_documents, prose=True),
    "news": _BuiltinSource(
        "Australian news articles from ABC News (the Lee background corpus)", _news_documents, prose=True
    ),
    "reviews": _BuiltinSource(
        "Movie reviews and review snippets from IMDB and Rotten Tomatoes", _reviews_documents, prose=True
    ),
    "python-code": _BuiltinSource(
        "Python source code of standard library modules", _python_code_documents, prose=False
    ),
    "python-docs": _BuiltinSource(
        "Python language reference and library documentation prose", _python_docs_documents, prose=False
    ),
}
"""Built-in source id -> description, document generator, and whether it is prose."""


# --------------------------------------------------------------------------------------------------
# User sources
# --------------------------------------------------------------------------------------------------


def _text_file_documents(path: Path) -> Iterator[str]:
    text = _read_utf8(path).replace("\r\n", "\n").replace("\r", "\n")
    for chunk in re.split(r"\n[ \t]*\n", text):
        if chunk.strip():
            yield chunk


def _jsonl_file_documents(path: Path, field: str) -> Iterator[str]:
    text = _read_utf8(path)
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


def _user_documents(category: Category) -> Iterator[str]:
    path = Path(category.source).expanduser()
    if path.is_dir():
        if category.format == "jsonl":
            files = sorted(p for p in path.rglob("*.jsonl") if p.is_file() and not _hidden(p, path))
            for file in files:
                yield from _jsonl_file_documents(file, category.jsonl_field)
        else:
            files = sorted(p for p in path.rglob("*.txt") if p.is_file() and not _hidden(p, path))
            for file in files:
                text = _read_utf8(file)
                if text.strip():
                    yield text
        if not files:
            kind = ".jsonl" if category.format == "jsonl" else ".txt"
            raise DataError(f"category {category.name!r}: folder {path} holds no {kind} files")
        return
    if not path.exists():
        raise DataError(f"category {category.name!r}: source {path} does not exist")
    fmt = category.format
    if fmt == "auto":
        fmt = "jsonl" if path.suffix.lower() in (".jsonl", ".ndjson") else "text"
    if fmt == "jsonl":
        yield from _jsonl_file_documents(path, category.jsonl_field)
    else:
        yield from _text_file_documents(path)


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


# --------------------------------------------------------------------------------------------------
# Reading documents
# --------------------------------------------------------------------------------------------------


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
        raw = _user_documents(category)
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


# --------------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------------


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
    folder = Path(folder)
    summary = read_json(folder / "splits.json")
    entries = summary.get("splits") if isinstance(summary, dict) else None
    if not isinstance(entries, dict) or set(entries) != set(SPLIT_NAMES):
        raise ArtifactError(f"{folder / 'splits.json'}: expected entries for {', '.join(SPLIT_NAMES)}")
    parts: dict[str, list[str]] = {}
    for name in SPLIT_NAMES:
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
        parts[name] = docs
    return CategorySplits(train=parts["train"], val=parts["val"], test=parts["test"])


# --------------------------------------------------------------------------------------------------
# Token blocks
# --------------------------------------------------------------------------------------------------


def token_blocks(texts: Sequence[str], tokenizer: Any, seq_len: int, max_blocks: int | None = None) -> torch.Tensor:
    """Tokenise texts into one stream and cut it into non-overlapping blocks of ``seq_len`` tokens.

    Each text is tokenised without special tokens; ``tokenizer.eos_token_id`` separates consecutive
    texts. The remainder shorter than ``seq_len`` is dropped. With ``max_blocks``, tokenisation stops
    once enough tokens for that many blocks exist and only the first ``max_blocks`` blocks are returned.

    Args:
        texts: Documents, in order.
        tokenizer: A Hugging Face tokenizer with an ``eos_token_id``.
        seq_len: Tokens per block.
        max_blocks: Optional cap on the number of blocks.

    Returns:
        A ``torch.long`` tensor of shape ``[num_blocks, seq_len]``.

    Raises:
        ValueError: ``seq_len`` / ``max_blocks`` < 1 or the tokenizer has no EOS token.
        DataError: The texts give fewer than ``seq_len`` tokens (zero blocks).
    """
    import torch

    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if max_blocks is not None and max_blocks < 1:
        raise ValueError(f"max_blocks must be >= 1 or None, got {max_blocks}")
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; documents cannot be separated")
    needed = None if max_blocks is None else max_blocks * seq_len
    ids: list[int] = []
    batch_size = 32
    texts = [t for t in texts if t]
    for start in range(0, len(texts), batch_size):
        batch = list(texts[start : start + batch_size])
        encoded = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
        for doc_ids in encoded:
            if ids:
                ids.append(eos)
            ids.extend(doc_ids)
        if needed is not None and len(ids) >= needed:
            break
    count = len(ids) // seq_len
    if max_blocks is not None:
        count = min(count, max_blocks)
    if count == 0:
        raise DataError(
            f"only {len(ids)} tokens in {len(texts)} text(s); need at least seq_len={seq_len} for one block"
        )
    return torch.tensor(ids[: count * seq_len], dtype=torch.long).view(count, seq_len)


def sample_blocks(blocks: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Choose ``n`` distinct rows of ``blocks`` deterministically (all rows, shuffled, if there are fewer).

    Args:
        blocks: ``[N, seq_len]`` token blocks.
        n: How many rows to pick (>= 1).
        seed: Seed of the choice; the same seed and inputs give the same rows in the same order.

    Returns:
        A ``[min(n, N), seq_len]`` tensor.
    """
    import torch

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if blocks.dim() != 2 or blocks.shape[0] == 0:
        raise ValueError(f"expected a non-empty [N, seq_len] tensor, got shape {tuple(blocks.shape)}")
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(blocks.shape[0], generator=generator)[: min(n, blocks.shape[0])]
    return blocks[index]


def source_fingerprint(category: Category) -> str:
    """sha256 identifying a category's source text, for cache keys.

    User sources hash their files' bytes (so editing a file invalidates cached stages); built-in
    sources hash the versions of what ships them (the Python stdlib and gensim).
    """
    import hashlib
    import importlib.metadata
    import sys

    digest = hashlib.sha256(category.source.encode())
    if category.is_builtin:
        digest.update(sys.version.encode())
        digest.update(importlib.metadata.version("gensim").encode())
        return digest.hexdigest()
    path = Path(category.source).expanduser()
    files = sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p, path)) if path.is_dir() else [path]
    for file in files:
        if not file.is_file():
            raise DataError(f"category {category.name!r}: source {file} does not exist")
        digest.update(file.name.encode())
        digest.update(sha256_file(file).encode())
    return digest.hexdigest()
