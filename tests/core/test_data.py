"""Tests of icm_core.data.documents: built-in corpora, user sources, category files, splits and token blocks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from icm_core.data.categories import Category, builtin_categories, load_category_file
from icm_core.data.config import DataConfig
from icm_core.data.corpora import BUILTIN_SOURCES, DEMO_SOURCES
from icm_core.data.corpora.mediawiki import strip_wiki_markup
from icm_core.data.documents import read_documents
from icm_core.data.splits import CategorySplits, read_splits, split_documents, write_splits
from icm_core.data.text import DataError, normalise_text
from icm_core.data.tokens import sample_blocks, token_blocks
from icm_core.infra.io import ArtifactError


CFG = DataConfig()
SMALL = DataConfig(max_chars=20_000, min_chars=500)
BUILTIN_NAMES = ["wikipedia", "news", "reviews", "python-code", "python-docs"]


@pytest.fixture(scope="module")
def builtin_docs() -> dict[str, list[str]]:
    return {category.name: read_documents(category, CFG) for category in builtin_categories()}


def _user(tmp_path: Path, source: Path | str, **kwargs) -> Category:
    return Category(name="mine", description="My own text", source=str(source), **kwargs)


def _prose(n: int, words: int = 40, tag: str = "doc") -> list[str]:
    return [" ".join(f"{tag}{i}w{j}" for j in range(words)) + "." for i in range(n)]


# --------------------------------------------------------------------------------------------------
# Built-in categories
# --------------------------------------------------------------------------------------------------


def test_builtin_categories_listed() -> None:
    categories = builtin_categories()
    assert [c.name for c in categories] == BUILTIN_NAMES
    assert list(DEMO_SOURCES) == BUILTIN_NAMES
    assert list(BUILTIN_SOURCES)[:5] == BUILTIN_NAMES  # the library lists the demo's five first
    for category in categories:
        assert category.source == f"builtin:{category.name}"
        assert category.is_builtin
        assert category.description and "\n" not in category.description and len(category.description) <= 300


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


def test_max_chars_cap_truncates_last_document() -> None:
    cfg = DataConfig(max_chars=5000, min_chars=100)
    docs = read_documents(builtin_categories()[1], cfg)
    assert sum(map(len, docs)) <= 5000
    assert sum(map(len, docs)) > 4500


def test_unknown_builtin_rejected() -> None:
    with pytest.raises(ValueError, match="unknown built-in source"):
        Category(name="x", description="d", source="builtin:nope")


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


def test_normalise_text() -> None:
    assert normalise_text("a\r\n\r\n\r\n\r\nb  \n") == "a\n\nb"
    assert normalise_text("def f():\n    return 1\n") == "def f():\n    return 1"
    assert normalise_text("word ,  other   word .", prose=True) == "word, other word."


# --------------------------------------------------------------------------------------------------
# User sources
# --------------------------------------------------------------------------------------------------


def test_user_text_file(tmp_path: Path) -> None:
    docs = _prose(6)
    path = tmp_path / "mine.txt"
    path.write_text("\n\n  \n".join(docs) + "\n", encoding="utf-8")
    assert read_documents(_user(tmp_path, path), SMALL) == docs


def test_user_jsonl_file(tmp_path: Path) -> None:
    docs = _prose(6)
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps({"body": d, "id": i}) for i, d in enumerate(docs)) + "\n\n", encoding="utf-8")
    assert read_documents(_user(tmp_path, path, jsonl_field="body"), SMALL) == docs


def test_user_folder(tmp_path: Path) -> None:
    docs = _prose(4)
    folder = tmp_path / "texts"
    folder.mkdir()
    for i, doc in reversed(list(enumerate(docs))):
        (folder / f"{i:02d}.txt").write_text(doc + "\n\nsecond paragraph " + str(i), encoding="utf-8")
    (folder / "ignored.md").write_text("not read", encoding="utf-8")
    read = read_documents(_user(tmp_path, folder), SMALL)
    assert read == [f"{doc}\n\nsecond paragraph {i}" for i, doc in enumerate(docs)]


def test_non_utf8_names_file_and_offset(tmp_path: Path) -> None:
    path = tmp_path / "latin.txt"
    path.write_bytes(b"caf\xe9 " * 200)
    with pytest.raises(DataError, match=r"latin\.txt.*byte offset 3"):
        read_documents(_user(tmp_path, path), SMALL)


def test_empty_source(tmp_path: Path) -> None:
    path = tmp_path / "empty.txt"
    path.write_text("  \n\n \t\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"'mine'.*empty\.txt.*empty"):
        read_documents(_user(tmp_path, path), SMALL)


def test_missing_source(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_documents(_user(tmp_path, tmp_path / "nope.txt"), SMALL)


def test_bad_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl: line 2: invalid JSON"):
        read_documents(_user(tmp_path, path), SMALL)
    path.write_text('{"text": "fine"}\n\n{"other": "x"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl: line 3: missing field 'text'"):
        read_documents(_user(tmp_path, path), SMALL)


def test_too_little_text(tmp_path: Path) -> None:
    path = tmp_path / "short.txt"
    path.write_text("just a few words", encoding="utf-8")
    with pytest.raises(DataError, match="category 'mine' has only 16 characters, need at least 500"):
        read_documents(_user(tmp_path, path), SMALL)


@pytest.mark.parametrize("name", ["../x", "a/b", "A B", "", "Caps", "x" * 65, "-lead"])
def test_bad_category_names(name: str) -> None:
    with pytest.raises(ValueError, match="invalid category name"):
        Category(name=name, description="d", source="builtin:news")


@pytest.mark.parametrize("description", ["", "   ", "two\nlines", "x" * 301])
def test_bad_descriptions(description: str) -> None:
    with pytest.raises(ValueError, match="description"):
        Category(name="ok", description=description, source="builtin:news")


def test_category_is_frozen_and_strict() -> None:
    category = Category(name="ok", description="d", source="builtin:news")
    with pytest.raises(ValueError):
        category.name = "other"  # type: ignore[misc]
    with pytest.raises(ValueError, match="colour"):
        Category(name="ok", description="d", source="builtin:news", colour="red")


# --------------------------------------------------------------------------------------------------
# Category files
# --------------------------------------------------------------------------------------------------


def test_load_category_file_yaml_resolves_paths(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "poems.txt").write_text("\n\n".join(_prose(5)), encoding="utf-8")
    path = tmp_path / "categories.yaml"
    path.write_text(
        "categories:\n"
        "  - name: poems\n    description: Poems I wrote\n    source: data/poems.txt\n"
        "  - name: news\n    description: News\n    source: builtin:news\n",
        encoding="utf-8",
    )
    poems, news = load_category_file(path)
    assert Path(poems.source) == tmp_path / "data" / "poems.txt"
    assert news.source == "builtin:news"
    assert len(read_documents(poems, SMALL)) == 5


def test_load_category_file_json(tmp_path: Path) -> None:
    path = tmp_path / "cats.json"
    path.write_text(json.dumps({"categories": [{"name": "a", "description": "A", "source": "builtin:reviews"}]}))
    assert [c.name for c in load_category_file(path)] == ["a"]


def test_load_category_file_duplicate(tmp_path: Path) -> None:
    path = tmp_path / "cats.yaml"
    entry = {"name": "twice", "description": "d", "source": "builtin:news"}
    path.write_text(json.dumps({"categories": [entry, entry]}), encoding="utf-8")
    with pytest.raises(DataError, match="duplicate category name 'twice'"):
        load_category_file(path)


def test_load_category_file_unknown_field(tmp_path: Path) -> None:
    path = tmp_path / "cats.yaml"
    path.write_text("categories:\n  - {name: a, description: d, source: 'builtin:news', colour: red}\n")
    with pytest.raises(DataError, match=r"cats\.yaml: categories\[0\]: colour: unknown field 'colour'"):
        load_category_file(path)


def test_load_category_file_bad_name_and_shape(tmp_path: Path) -> None:
    path = tmp_path / "cats.yaml"
    path.write_text("categories:\n  - {name: '../x', description: d, source: 'builtin:news'}\n")
    with pytest.raises(DataError, match=r"categories\[0\]: name: .*invalid category name"):
        load_category_file(path)
    path.write_text("cats: []\n")
    with pytest.raises(DataError, match="top-level 'categories:'"):
        load_category_file(path)


# --------------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------------


def _check_splits(splits: CategorySplits, docs: list[str]) -> None:
    assert splits.train and splits.val and splits.test
    train, val, test = set(splits.train), set(splits.val), set(splits.test)
    assert not (train & val) and not (train & test) and not (val & test)


def test_split_deterministic_disjoint() -> None:
    docs = _prose(100)
    a, b = split_documents(docs, CFG), split_documents(docs, CFG)
    assert a == b
    _check_splits(a, docs)
    assert sorted(a.train + a.val + a.test) == sorted(docs)  # whole documents, none lost
    assert len(a.test) == 15 and len(a.val) == 10
    other = split_documents(docs, DataConfig(split_seed=1))
    assert other.test != a.test


def test_split_drops_duplicates() -> None:
    docs = _prose(30) * 2
    splits = split_documents(docs, CFG)
    _check_splits(splits, docs)
    assert len(splits.train) + len(splits.val) + len(splits.test) == 30


@pytest.mark.parametrize("count", [1, 2])
def test_split_few_huge_documents(count: int) -> None:
    docs = ["\n\n".join(_prose(50, tag=f"d{k}p")) for k in range(count)]
    splits = split_documents(docs, CFG)
    _check_splits(splits, docs)
    total = sum(map(len, docs))
    test_chars = sum(map(len, splits.test))
    assert 0.07 * total < test_chars < 0.25 * total
    assert splits == split_documents(docs, CFG)


def test_split_single_line_document() -> None:
    docs = [" ".join(f"w{i}" for i in range(400))]  # no paragraphs or lines: cut at spaces
    _check_splits(split_documents(docs, CFG), docs)


def test_split_nothing() -> None:
    with pytest.raises(DataError):
        split_documents(["", "  "], CFG)


def test_write_read_splits_round_trip(tmp_path: Path) -> None:
    splits = split_documents(_prose(20) + ['ünïcode "quotes"\nand lines'], CFG)
    summary = write_splits(splits, tmp_path / "s")
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [
        "splits.json",
        "test.jsonl",
        "train.jsonl",
        "val.jsonl",
    ]
    assert summary["splits"]["test"]["documents"] == len(splits.test)
    assert summary["splits"]["train"]["chars"] == sum(map(len, splits.train))
    assert json.loads((tmp_path / "s" / "splits.json").read_text()) == summary
    assert read_splits(tmp_path / "s") == splits


def test_read_splits_detects_corruption(tmp_path: Path) -> None:
    write_splits(split_documents(_prose(20), CFG), tmp_path)
    val = tmp_path / "val.jsonl"
    val.write_text(val.read_text().replace("doc", "dog", 1))
    with pytest.raises(ArtifactError, match=r"val\.jsonl: sha256 mismatch"):
        read_splits(tmp_path)
    val.unlink()
    with pytest.raises(ArtifactError, match=r"val\.jsonl: split file not found"):
        read_splits(tmp_path)


# --------------------------------------------------------------------------------------------------
# Token blocks
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(50)]
    vocab = {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>")


def test_token_blocks(tiny_tokenizer) -> None:
    texts = [" ".join(f"w{i}" for i in range(10)), "w1 w2 w3", "w4 w5"]  # 10 + 1 + 3 + 1 + 2 = 17 tokens
    blocks = token_blocks(texts, tiny_tokenizer, seq_len=4)
    assert blocks.dtype == torch.long and blocks.shape == (4, 4)
    flat = blocks.flatten().tolist()
    assert flat[:12] == [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 1, 3]  # eos (1) between documents, no bos
    assert 1 not in flat[:10]
    assert token_blocks(texts, tiny_tokenizer, seq_len=4, max_blocks=2).shape == (2, 4)
    assert token_blocks(texts, tiny_tokenizer, seq_len=17).shape == (1, 17)
    with pytest.raises(DataError, match="17 tokens"):
        token_blocks(texts, tiny_tokenizer, seq_len=18)


def test_sample_blocks() -> None:
    blocks = torch.arange(40).view(10, 4)
    a = sample_blocks(blocks, 3, seed=0)
    assert a.shape == (3, 4)
    assert torch.equal(a, sample_blocks(blocks, 3, seed=0))
    assert len({tuple(row.tolist()) for row in a}) == 3
    every = sample_blocks(blocks, 50, seed=1)
    assert every.shape == (10, 4)
    assert sorted(every[:, 0].tolist()) == list(range(0, 40, 4))
