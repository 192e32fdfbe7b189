"""Tests of the category library: its sources (icm_core.data.corpora), families and the Debian readers."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from icm_core.data.categories import Category, builtin_categories, library_categories
from icm_core.data.config import DataConfig
from icm_core.data.corpora import debian as deb
from icm_core.data.corpora import debian_fetch
from icm_core.data.corpora.base import FAMILIES
from icm_core.data.corpora.markup import html_to_text
from icm_core.data.corpora.mediawiki import strip_wiki_markup
from icm_core.data.corpora.sources import BUILTIN_SOURCES, DEMO_SOURCES
from icm_core.data.documents import read_documents, source_fingerprint
from icm_core.data.splits import split_documents
from icm_core.data.text import DataError
from tests.core.data.support import CFG


def test_library_has_32_categories_in_5_families_with_one_line_descriptions() -> None:
    library = library_categories()
    assert len(library) >= 32
    families = {c.family for c in library}
    assert families == set(FAMILIES) and len(families) >= 5
    for family in FAMILIES:
        assert sum(c.family == family for c in library) >= 4, family
    assert [c.name for c in library[:5]] == list(DEMO_SOURCES)
    assert len({c.name for c in library}) == len(library)
    descriptions = [c.description for c in library]
    assert len(set(descriptions)) == len(descriptions)
    assert all("\n" not in d and 10 < len(d) <= 300 for d in descriptions)


def test_library_families_filter_and_unknown_family() -> None:
    code = library_categories(["code"])
    assert code and all(c.family == "code" for c in code)
    assert "python-code" in [c.name for c in code]
    with pytest.raises(ValueError, match="unknown families"):
        library_categories(["poetry"])


def test_demo_categories_unchanged() -> None:
    assert [(c.name, c.description, c.source) for c in builtin_categories()] == [
        ("wikipedia", "Encyclopedia articles from English Wikipedia", "builtin:wikipedia"),
        ("news", "Australian news articles from ABC News (the Lee background corpus)", "builtin:news"),
        ("reviews", "Movie reviews and review snippets from IMDB and Rotten Tomatoes", "builtin:reviews"),
        ("python-code", "Python source code of standard library modules", "builtin:python-code"),
        ("python-docs", "Python language reference and library documentation prose", "builtin:python-docs"),
    ]
    assert all(BUILTIN_SOURCES[name].debian_packages == () for name in DEMO_SOURCES)


def test_every_library_source_is_accepted_by_the_category_model() -> None:
    for key in BUILTIN_SOURCES:
        assert Category(name=key, description="x", source=f"builtin:{key}").is_builtin
    with pytest.raises(ValueError, match="unknown built-in source"):
        Category(name="x", description="x", source="builtin:nope")


def test_newsgroups_are_read_without_unpickling() -> None:
    docs = read_documents(Category(name="newsgroups", description="x", source="builtin:newsgroups"), DataConfig())
    assert len(docs) >= 150
    assert not any(d.startswith(("Path:", "Xref:", "Newsgroups:")) for d in docs)  # header block dropped


def test_html_to_text_drops_markup_and_keeps_code_layout() -> None:
    page = (
        "<html><head><title>T</title><style>p{}</style></head><body><h1>Intro</h1>"
        "<p>Some   <b>bold</b>\n text.</p><script>var x;</script><pre>def f():\n    return 1</pre></body></html>"
    )
    text = html_to_text(page)
    assert "Intro" in text and "Some bold text." in text
    assert "var x" not in text and "p{}" not in text and "<" not in text
    assert "def f():\n    return 1" in text


# --------------------------------------------------------------------------------------------------
# Debian readers on a fake extracted package tree
# --------------------------------------------------------------------------------------------------


def _fake_package(root: Path, package: str, files: dict[str, bytes]) -> None:
    for relative, data in files.items():
        path = root / package / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    record = {"package": package, "version": "1.0", "deb_sha256": "ab" * 32}
    (root / f"{package}.json").write_text(json.dumps(record))


def test_debian_readers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(deb.DEBIAN_DIR_ENV, str(tmp_path))
    cookies = "one\n%\ntwo\n%\nthree\n%\nfour\n%\nfive\n"
    _fake_package(
        tmp_path,
        "pkg",
        {
            "usr/share/games/fortunes/q": cookies.encode(),
            "usr/share/t/table.gz": gzip.compress(b"a:1\nb:2\nc:3\n\nd:4\n"),
            "usr/share/t/skip.txt": b"ignored",
            "usr/share/p/doc.txt": b"front matter\nSTART\npara one\n\npara two\n\npara three",
        },
    )
    spec = deb.DebianSpec("d", "short", ("pkg",), ("usr/share/games/fortunes/q",), "fortune", group=2)
    assert list(deb._documents(spec)) == ["one\n\ntwo", "three\n\nfour", "five"]
    spec = deb.DebianSpec("d", "structured", ("pkg",), ("usr/share/t/*",), "lines", group=3, exclude=r"skip")
    assert list(deb._documents(spec)) == ["a:1\nb:2\nc:3", "d:4"]
    spec = deb.DebianSpec("d", "docs", ("pkg",), ("usr/share/p/*",), "paragraphs", group=2, start="^START")
    assert list(deb._documents(spec)) == ["START\npara one\n\npara two", "para three"]


def test_debian_missing_package_names_it_and_the_make_target(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(deb.DEBIAN_DIR_ENV, str(tmp_path))
    (tmp_path / "fortunes").mkdir()  # extracted but without its record: an interrupted fetch
    category = Category(name="fortunes-startrek", description="x", source="builtin:fortunes-startrek")
    with pytest.raises(DataError, match=r"'fortunes'.*make corpora"):
        read_documents(category, DataConfig())
    with pytest.raises(DataError, match=r"'fortunes'.*make corpora"):
        source_fingerprint(category)


def test_debian_fingerprint_follows_the_package_record(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(deb.DEBIAN_DIR_ENV, str(tmp_path))
    _fake_package(tmp_path, "fortunes", {"usr/share/games/fortunes/startrek": b"x\n%\ny\n"})
    category = Category(name="fortunes-startrek", description="x", source="builtin:fortunes-startrek")
    before = source_fingerprint(category)
    record = json.loads((tmp_path / "fortunes.json").read_text())
    record["version"] = "2.0"
    (tmp_path / "fortunes.json").write_text(json.dumps(record))
    assert source_fingerprint(category) != before


def test_fetch_names_the_package_when_apt_fails(tmp_path: Path, monkeypatch) -> None:
    import subprocess

    def fake_run(command, cwd):
        return subprocess.CompletedProcess(command, 100, "", "E: Unable to locate package no-such-pkg")

    monkeypatch.setattr(debian_fetch, "_run", fake_run)
    monkeypatch.setattr(debian_fetch.shutil, "which", lambda tool: "/usr/bin/" + tool)
    with pytest.raises(DataError, match="no-such-pkg"):
        debian_fetch.fetch_packages(["no-such-pkg"], tmp_path)
    assert not (tmp_path / "no-such-pkg").exists() and not (tmp_path / "no-such-pkg.json").exists()


@pytest.mark.skipif(
    any(deb.package_record(p) is None for p in deb.debian_packages()),
    reason="the Debian corpora are not fetched (`make corpora`; `make test` does it)",
)
def test_every_library_category_reads_enough_real_text() -> None:
    cfg = DataConfig(max_chars=30_000)
    for category in library_categories():
        docs = read_documents(category, cfg)
        assert sum(map(len, docs)) >= 20_000, category.name


@pytest.fixture(scope="module")
def builtin_docs() -> dict[str, list[str]]:
    return {category.name: read_documents(category, CFG) for category in builtin_categories()}


# --------------------------------------------------------------------------------------------------
# Built-in categories
# --------------------------------------------------------------------------------------------------


def test_builtin_sources_give_real_text(builtin_docs: dict[str, list[str]]) -> None:
    for name, docs in builtin_docs.items():
        total = sum(map(len, docs))
        assert CFG.min_chars <= total <= CFG.max_chars, name
        assert len(docs) >= 5, name
        assert all(doc and doc == doc.strip() for doc in docs), name
        assert len(set(docs)) == len(docs), name


def test_wikipedia_markup_stripped(builtin_docs: dict[str, list[str]]) -> None:
    docs = builtin_docs["wikipedia"]
    text = "\n".join(docs)
    for marker in ("{{", "}}", "[[", "]]", "<ref", "</ref>", "'''", "{|", "|}", "==", "<!--", "&amp;", "thumb|"):
        assert marker not in text, marker
    assert docs[0].startswith("Anarchism\n\nAnarchism is a political philosophy")
    assert not any(doc.lstrip().upper().startswith("#REDIRECT") for doc in docs)
    assert all(len(doc) >= 300 for doc in docs[:-1])  # near-empty pages are skipped
    assert len(docs) >= 20


def test_news_and_reviews(builtin_docs: dict[str, list[str]]) -> None:
    news = builtin_docs["news"]
    assert news[0].startswith("Hundreds of people have been forced to vacate their homes")
    reviews = builtin_docs["reviews"]
    text = "\n".join(reviews)
    assert "__label__" not in text
    assert "_*" not in text
    assert "\ufffd" not in text  # the Windows-1252 polarity file is decoded, not mangled
    assert reviews[0].startswith("simplistic, silly and tedious.")
    assert reviews[0].count("\n") == 9  # ten sentences per document
    assert any(doc.startswith("it was a bit bizarre and evil") for doc in reviews)


def test_python_sources(builtin_docs: dict[str, list[str]]) -> None:
    code = builtin_docs["python-code"]
    assert any("def " in doc and "import " in doc for doc in code)
    assert any("\n    " in doc for doc in code)  # indentation survives normalisation
    docs = builtin_docs["python-docs"]
    assert docs[0].startswith('The "assert" statement')
    assert "topics = {" not in "\n".join(docs)


def test_builtin_splits_differ(builtin_docs: dict[str, list[str]]) -> None:
    tests = []
    for name, docs in builtin_docs.items():
        splits = split_documents(docs, CFG)
        assert splits.train and splits.val and splits.test, name
        assert splits.test != splits.train, name
        assert not set(splits.test) & set(splits.train), name
        tests.append(tuple(splits.test))
    assert len(set(tests)) == len(tests)  # every category has its own test text


# --------------------------------------------------------------------------------------------------
# Wiki markup
# --------------------------------------------------------------------------------------------------


def test_strip_wiki_markup() -> None:
    raw = (
        "{{Infobox|name={{nested|x}}|y=1}}\n"
        "'''Foo''' is a [[bar (thing)|bar]] and a [[baz]]s.<ref name=a>{{cite web|url=x}}</ref>"
        "<ref name=b/> See [http://example.com the site].<!-- hidden -->\n"
        "[[File:Foo.jpg|thumb|A caption with [[link]]]]\n"
        "== History ==\n"
        "{| class=wikitable\n|-\n| cell || cell\n|}\n"
        "* Item ''one''\n"
        "[[Category:Things]]\n[[de:Foo]]\n"
        "== References ==\n{{reflist}}\n* Some citation\n"
    )
    text = strip_wiki_markup(raw)
    assert text == "Foo is a bar and a bazs. See the site.\n\nHistory\nItem one"


# --------------------------------------------------------------------------------------------------
# User sources
# --------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------
# Category files
# --------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------
# Token blocks
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_fetch_module_runs_as_a_command():
    """``make corpora`` runs ``python -m icm_core.data.corpora.debian_fetch``: the module must run its main."""
    command = [sys.executable, "-m", "icm_core.data.corpora.debian_fetch", "--help"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Fetch the Debian packages" in result.stdout
