"""Text that the ``gensim`` wheel (PyPI) ships as test data: Wikipedia dumps, news, reviews, forum posts, word lists.

Every reader is a generator over ``gensim/test/test_data``; nothing is downloaded.
"""

from __future__ import annotations

import pickletools
import re
import zlib
from collections.abc import Iterator
from pathlib import Path

from icm_core.data.corpora.base import BuiltinSource, package_file, read_lenient
from icm_core.data.corpora.mediawiki import mediawiki_documents
from icm_core.data.text import DataError


__all__ = ["GENSIM_SOURCES"]

_DATA = "test/test_data/"
_ENWIKI_FILE = _DATA + "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def _lines(path: Path) -> Iterator[str]:
    for line in read_lenient(path).splitlines():
        if line.strip():
            yield line


def _wikipedia_documents() -> Iterator[str]:
    yield from mediawiki_documents(package_file("gensim", _ENWIKI_FILE))


def _news_documents() -> Iterator[str]:
    yield from _lines(package_file("gensim", _DATA + "lee_background.cor"))


_REVIEW_GROUP = 10


def _reviews_documents() -> Iterator[str]:
    polarity = package_file("gensim", _DATA + "pang_lee_polarity.cor")
    imdb = package_file("gensim", _DATA + "alldata-id-10.txt")
    sentences = [re.sub(r"^__label__\S+\s*", "", line).strip() for line in _lines(polarity)]
    sentences = [s for s in sentences if s]
    for start in range(0, len(sentences), _REVIEW_GROUP):
        yield "\n".join(sentences[start : start + _REVIEW_GROUP])
    for line in _lines(imdb):
        review = re.sub(r"^_\*\d+\s+", "", line).strip()
        if review:
            yield review


_NEWS_HEADER_RE = re.compile(r"^[A-Za-z-]+: .*$")
"""A mail header line (``Subject: ...``)."""


def _newsgroup_posts() -> Iterator[str]:
    path = package_file("gensim", _DATA + "mini_newsgroup")
    # The sample is a pickled scikit-learn Bunch. It is read without unpickling (a pickle is code):
    # pickletools only parses the opcode stream, and the posts are its string arguments.
    try:
        ops = list(pickletools.genops(zlib.decompress(path.read_bytes())))
    except (zlib.error, ValueError) as exc:
        raise DataError(f"{path}: cannot read the 20 Newsgroups sample ({exc})") from exc
    posts = [arg for op, arg, _pos in ops if op.name == "UNICODE" and _NEWS_HEADER_RE.match(arg.split("\n", 1)[0])]
    if not posts:
        raise DataError(f"{path}: no newsgroup posts found in the 20 Newsgroups sample")
    for post in posts:
        if not isinstance(post, str):
            continue
        # Drop the mail header block (Path:, From:, Message-ID:, ...) but keep the subject as the post's title.
        head, _, body = post.partition("\n\n")
        subject = next((line[9:].strip() for line in head.splitlines() if line.startswith("Subject: ")), "")
        if not all(_NEWS_HEADER_RE.match(line) or line.startswith((" ", "\t")) for line in head.splitlines()):
            body = post  # no header block
        if body.strip():
            yield f"{subject}\n\n{body}" if subject else body


def _word_similarity_documents() -> Iterator[str]:
    # Two word-pair tables: SimLex-999 (tab-separated ratings) and the word2vec analogy questions.
    simlex = [line for line in _lines(package_file("gensim", _DATA + "simlex999.txt")) if not line.startswith("#")]
    for start in range(0, len(simlex), 40):
        yield "\n".join(simlex[start : start + 40])
    section: list[str] = []
    for line in _lines(package_file("gensim", _DATA + "questions-words.txt")):
        if line.startswith(":") and section:
            yield from _chunks(section, 40)
            section = []
        section.append(line)
    yield from _chunks(section, 40)


def _chunks(lines: list[str], size: int) -> Iterator[str]:
    for start in range(0, len(lines), size):
        yield "\n".join(lines[start : start + size])


GENSIM_SOURCES: dict[str, BuiltinSource] = {
    "wikipedia": BuiltinSource(
        "Encyclopedia articles from English Wikipedia", _wikipedia_documents, True, "prose", "pypi:gensim"
    ),
    "news": BuiltinSource(
        "Australian news articles from ABC News (the Lee background corpus)",
        _news_documents,
        True,
        "prose",
        "pypi:gensim",
    ),
    "reviews": BuiltinSource(
        "Movie reviews and review snippets from IMDB and Rotten Tomatoes",
        _reviews_documents,
        True,
        "prose",
        "pypi:gensim",
    ),
    "newsgroups": BuiltinSource(
        "Usenet discussion posts from the 20 Newsgroups sample: replies, quotes and signatures",
        _newsgroup_posts,
        False,
        "short",
        "pypi:gensim",
    ),
    "word-pairs": BuiltinSource(
        "Word-pair tables: SimLex-999 similarity ratings and word2vec analogy questions",
        _word_similarity_documents,
        False,
        "structured",
        "pypi:gensim",
    ),
}
"""The gensim-shipped sources; the first three are demo categories."""
