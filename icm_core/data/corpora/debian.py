"""Text shipped in Debian packages: documentation, source code, quotes, dictionaries and data tables.

The project fetches the packages itself (``make corpora``, :mod:`icm_core.data.corpora.debian_fetch`): each is
extracted to ``<root>/<package>/`` and recorded in ``<root>/<package>.json``. The root is ``$ICM_DEBIAN_DIR`` or
``artifacts/corpora/debian``.

A source is declared as data (:class:`DebianSpec`): which packages, which files (globs under the
extracted tree) and how a file becomes documents (one per file, HTML pages, fortune cookies, groups
of paragraphs, or groups of lines for tables).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from icm_core.data.corpora.base import BuiltinSource, Family, read_lenient
from icm_core.data.corpora.markup import html_to_text
from icm_core.data.text import DataError


__all__ = [
    "DEBIAN_DIR_ENV",
    "DEBIAN_SOURCES",
    "DebianSpec",
    "debian_packages",
    "debian_root",
    "package_record",
]

DEBIAN_DIR_ENV = "ICM_DEBIAN_DIR"
"""Environment variable naming the folder the Debian packages are extracted to."""
DEFAULT_DEBIAN_DIR = Path("artifacts/corpora/debian")

Reader = Literal["file", "html", "fortune", "paragraphs", "lines"]


@dataclass(frozen=True)
class DebianSpec:
    """A category read from Debian packages.

    Attributes:
        description: One-line description of the text.
        family: The library family.
        packages: Debian package names the files come from.
        include: Glob patterns (``Path.glob`` syntax) under each extracted package tree.
        reader: ``file`` (one document per file), ``html`` (one per page, markup stripped), ``fortune``
            (cookies separated by ``%`` lines, ``group`` per document), ``paragraphs`` (blank-line
            separated paragraphs, ``group`` per document) or ``lines`` (``group`` lines per document).
        group: Units per document for the grouping readers.
        exclude: Regular expression; files whose path (relative to the package tree) matches are skipped.
        prose: Whether inline whitespace may be collapsed.
        start: Regular expression (multi-line); a file's text before its first match is dropped (front matter).
    """

    description: str
    family: Family
    packages: tuple[str, ...]
    include: tuple[str, ...]
    reader: Reader = "file"
    group: int = 1
    exclude: str | None = None
    prose: bool = False
    start: str | None = None


def debian_root() -> Path:
    """The folder holding the extracted packages (``$ICM_DEBIAN_DIR``, default ``artifacts/corpora/debian``)."""
    return Path(os.environ.get(DEBIAN_DIR_ENV) or DEFAULT_DEBIAN_DIR).expanduser()


def package_record(package: str, root: Path | None = None) -> dict | None:
    """The record of an extracted package (``{"package", "version", "deb_sha256"}``), or None if absent."""
    path = (root or debian_root()) / f"{package}.json"
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and (path.parent / package).is_dir() else None


def _package_tree(package: str) -> Path:
    root = debian_root()
    if package_record(package, root) is None:
        raise DataError(
            f"{root / package}: Debian package {package!r} has not been fetched; run `make corpora` "
            f"(apt-get download + dpkg-deb -x into {root}), or point {DEBIAN_DIR_ENV} at a folder that holds it"
        )
    return root / package


def _files(spec: DebianSpec) -> list[Path]:
    skip = re.compile(spec.exclude) if spec.exclude else None
    found: list[Path] = []
    for package in spec.packages:
        tree = _package_tree(package)
        matches: set[Path] = set()
        for pattern in spec.include:
            matches.update(p for p in tree.glob(pattern) if p.is_file())
        found.extend(p for p in sorted(matches) if not (skip and skip.search(p.relative_to(tree).as_posix())))
    if not found:
        raise DataError(
            f"Debian packages {', '.join(spec.packages)}: no file matches {', '.join(spec.include)} under "
            f"{debian_root()}; the package layout changed or the extraction is incomplete (re-run `make corpora`)"
        )
    return found


def _groups(units: Iterable[str], size: int) -> Iterator[str]:
    batch: list[str] = []
    for unit in units:
        if unit.strip():
            batch.append(unit.strip("\n"))
        if len(batch) == size:
            yield "\n\n".join(batch) if size > 1 else batch[0]
            batch = []
    if batch:
        yield "\n\n".join(batch)


def _documents(spec: DebianSpec) -> Iterator[str]:
    for path in _files(spec):
        text = read_lenient(path)
        if spec.start:
            found = re.search(spec.start, text, flags=re.MULTILINE)
            text = text[found.start() :] if found else text
        if spec.reader == "file":
            yield text
        elif spec.reader == "html":
            yield html_to_text(text)
        elif spec.reader == "fortune":
            yield from _groups(re.split(r"^%\s*$", text, flags=re.MULTILINE), spec.group)
        elif spec.reader == "paragraphs":
            yield from _groups(re.split(r"\n[ \t]*\n", text), spec.group)
        else:  # lines: tables keep one record per line
            lines = [line for line in text.splitlines() if line.strip()]
            for start in range(0, len(lines), spec.group):
                yield "\n".join(lines[start : start + spec.group])


_SHARE = "usr/share/"
_SPECS: dict[str, DebianSpec] = {
    # --- prose -------------------------------------------------------------------------------------
    "debian-history": DebianSpec(
        "A history of the Debian project: its founding, releases, leaders and manifesto",
        "prose", ("debian-history",), (_SHARE + "doc/debian-history/docs/*.en.html",), "html", prose=True,
    ),
    "licenses": DebianSpec(
        "Free software licence texts (GPL, LGPL, Apache, MPL, Artistic, GFDL): legal prose",
        "prose", ("base-files",), (_SHARE + "common-licenses/*",), "paragraphs", group=6, prose=True,
    ),
    # --- source code -------------------------------------------------------------------------------
    "javascript-code": DebianSpec(
        "JavaScript source code: the lodash utility library as ES modules",
        "code", ("node-lodash",), (_SHARE + "nodejs/lodash-es/*.js",),
    ),
    "vim-script": DebianSpec(
        "Vim script: editor plugins, file-type settings and autoload functions of Vim's runtime",
        "code", ("vim-runtime",), (_SHARE + "vim/vim90/autoload/**/*.vim", _SHARE + "vim/vim90/ftplugin/*.vim"),
    ),
    "rust-code": DebianSpec(
        "Rust source code of the regex and serde crates",
        "code", ("librust-regex-dev", "librust-serde-dev"), (_SHARE + "cargo/registry/*/src/**/*.rs",),
    ),
    "go-code": DebianSpec(
        "Go source code of the cobra command-line library and the testify test toolkit",
        "code", ("golang-github-spf13-cobra-dev", "golang-github-stretchr-testify-dev"),
        (_SHARE + "gocode/src/**/*.go",),
    ),
    "perl-code": DebianSpec(
        "Perl modules of the Perl 5 core library (code with embedded POD)",
        "code", ("perl-modules-5.36",), (_SHARE + "perl/5.36.0/**/*.pm",),
    ),
    "ruby-code": DebianSpec(
        "Ruby source code of the Rack web server interface",
        "code", ("ruby-rack",), (_SHARE + "rubygems-integration/all/gems/*/lib/**/*.rb",),
    ),
    "php-code": DebianSpec(
        "PHP source code of the Symfony Console component",
        "code", ("php-symfony-console",), (_SHARE + "php/Symfony/Component/Console/**/*.php",),
    ),
    "lua-code": DebianSpec(
        "Lua source code of the Penlight utility libraries",
        "code", ("lua-penlight",), (_SHARE + "lua/5.1/pl/*.lua",),
    ),
    "emacs-lisp": DebianSpec(
        "Emacs Lisp source code of the dash list library and the s string library",
        "code", ("elpa-dash", "elpa-s"), (_SHARE + "emacs/site-lisp/elpa-src/*/*.el",),
        exclude=r"(-autoloads|-pkg)\.el$",
    ),
    "shell-scripts": DebianSpec(
        "Bash shell scripts: example functions, start-up files and small utilities",
        "code", ("bash-doc",),
        tuple(_SHARE + f"doc/bash/examples/{d}/*" for d in ("functions", "scripts", "misc", "startup-files")),
        exclude=r"\.(png|gz|xz|tar)$",
    ),
    # --- technical documentation -------------------------------------------------------------------
    "debian-reference": DebianSpec(
        "The Debian Reference manual: system administration, packages, networking and tools",
        "docs", ("debian-reference-en",), (_SHARE + "debian-reference/*.en.html",), "html",
    ),
    "debian-faq": DebianSpec(
        "The Debian GNU/Linux FAQ: questions and answers about the distribution",
        "docs", ("debian-faq",), (_SHARE + "doc/debian/FAQ/*.en.html",), "html",
    ),
    "gnu-standards": DebianSpec(
        "The GNU Coding Standards and the GNU maintainers' guide",
        "docs", ("gnu-standards",), (_SHARE + "doc/gnu-standards/*.text.gz",), "paragraphs", group=8,
    ),
    "perl-pod": DebianSpec(
        "Perl's manual pages in POD markup: language reference, FAQ and tutorials",
        "docs", ("perl-doc",), (_SHARE + "perl/5.36.0/pod/*.pod",), exclude=r"delta\.pod$",
    ),
    "sqlite-docs": DebianSpec(
        "SQLite documentation: SQL syntax, C interface and file format",
        "docs", ("sqlite3-doc",), (_SHARE + "doc/sqlite3/*.html",), "html",
    ),
    "postgresql-docs": DebianSpec(
        "PostgreSQL 15 manual: SQL commands, server administration and client interfaces",
        "docs", ("postgresql-doc-15",), (_SHARE + "doc/postgresql-doc-15/html/*.html",), "html",
    ),
    "haskell-report": DebianSpec(
        "The Haskell 98 language and libraries report",
        "docs", ("haskell98-report",), (_SHARE + "doc/haskell98-report/html/haskell98-report-html/*.html",),
        "html",
    ),
    "man-pages-c": DebianSpec(
        "Linux manual pages of system calls and C library functions, in roff markup",
        "docs", ("manpages-dev",), (_SHARE + "man/man2/*.gz", _SHARE + "man/man3/*.gz"),
    ),
    "man-pages-files": DebianSpec(
        "Linux manual pages of file formats, devices and conventions, in roff markup",
        "docs", ("manpages",), (_SHARE + "man/man4/*.gz", _SHARE + "man/man5/*.gz", _SHARE + "man/man7/*.gz"),
    ),
    "r-manuals": DebianSpec(
        "The R manuals in GNU Info format: introduction, FAQ, data import and extensions",
        "docs", ("r-doc-info",), (_SHARE + "info/R-*.info*.gz",), "paragraphs", group=8,
    ),
    # --- dialogue and short forms ------------------------------------------------------------------
    "jargon-file": DebianSpec(
        "The Jargon File: a glossary of hacker slang with short entries",
        "short", ("jargon-text",), (_SHARE + "doc/jargon-text/jargon.txt.gz",), "paragraphs", group=8,
        start=r"^ *:\(TM\):",
    ),
    "devils-dictionary": DebianSpec(
        "Ambrose Bierce's Devil's Dictionary: satirical definitions",
        "short", ("dict-devil",), (_SHARE + "dictd/devil.dict.dz",), "paragraphs", group=6, prose=True,
    ),
    "fortunes-startrek": DebianSpec(
        "Star Trek quotations with speaker, episode and stardate",
        "short", ("fortunes",), (_SHARE + "games/fortunes/startrek",), "fortune", group=8,
    ),
    "fortunes-poems": DebianSpec(
        "Short poems, song lyrics and verse from the fortune cookie collection",
        "short", ("fortunes",), (_SHARE + "games/fortunes/songs-poems",), "fortune", group=4,
    ),
    "fortunes-computers": DebianSpec(
        "Jokes, aphorisms and quotations about computers and programmers",
        "short", ("fortunes",), (_SHARE + "games/fortunes/computers",), "fortune", group=8,
    ),
    "fortunes-riddles": DebianSpec(
        "Riddles with their answers",
        "short", ("fortunes-min",), (_SHARE + "games/fortunes/riddles",), "fortune", group=8,
    ),
    "bofh-excuses": DebianSpec(
        "One-line excuses of the Bastard Operator From Hell for computer failures",
        "short", ("fortunes-bofh-excuses",), (_SHARE + "games/fortunes/bofh-excuses",), "fortune", group=20,
    ),
    # --- structured and tabular text ---------------------------------------------------------------
    "unicode-data": DebianSpec(
        "The Unicode Character Database: semicolon-separated character properties, one code point per line",
        "structured", ("unicode-data",), (_SHARE + "unicode/UnicodeData.txt",), "lines", group=40,
    ),
    "tz-rules": DebianSpec(
        "The time zone database in its compact source form: rules, zones and links, plus zone tables",
        "structured", ("tzdata",), (_SHARE + "zoneinfo/tzdata.zi", _SHARE + "zoneinfo/*.tab"), "lines", group=40,
    ),
    "iso-codes-json": DebianSpec(
        "ISO code lists as JSON: countries, languages, currencies and scripts",
        "structured", ("iso-codes",), (_SHARE + "iso-codes/json/iso_*.json",), "lines", group=40,
    ),
    "data-tables": DebianSpec(
        "Colon- and tab-separated reference tables: airport codes, countries, currencies, phone prefixes",
        "structured", ("miscfiles",),
        tuple(_SHARE + f"misc/{n}.gz" for n in ("airport", "countries", "currency", "inter.phone", "na.phone",
                                                  "languages", "top-level.domains")),
        "lines", group=40,
    ),
}  # fmt: skip


def _source(spec: DebianSpec) -> BuiltinSource:
    return BuiltinSource(
        spec.description,
        lambda: _documents(spec),
        spec.prose,
        spec.family,
        "debian:" + ",".join(spec.packages),
        spec.packages,
    )


DEBIAN_SPECS: dict[str, DebianSpec] = _SPECS
DEBIAN_SOURCES: dict[str, BuiltinSource] = {name: _source(spec) for name, spec in _SPECS.items()}
"""The Debian-package sources of the library, by category name."""


def debian_packages() -> list[str]:
    """Every Debian package the library reads, sorted."""
    return sorted({p for spec in _SPECS.values() for p in spec.packages})
