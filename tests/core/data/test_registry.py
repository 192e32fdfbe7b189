"""The category registry: a file or a folder of category files, fingerprints, and diffs between scans."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from icm_core.data.registry import diff_registry, load_registry, registry_fingerprints
from icm_core.data.text import DataError


def write(folder: Path, name: str, entries: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump({"categories": entries}), encoding="utf-8")
    return path


def entry(name: str, source: str = "builtin:news") -> dict:
    return {"name": name, "description": f"{name} text", "source": source}


def test_folder_registry_reads_every_file_in_name_order(tmp_path):
    write(tmp_path, "b.yaml", [entry("beta"), entry("gamma")])
    write(tmp_path, "a.yml", [entry("alpha")])
    (tmp_path / "notes.txt").write_text("not a category file")
    (tmp_path / ".hidden.yaml").write_text("broken: [")
    assert [c.name for c in load_registry(tmp_path)] == ["alpha", "beta", "gamma"]
    assert [c.name for c in load_registry(tmp_path / "b.yaml")] == ["beta", "gamma"]  # a single file works too


def test_bad_registries_name_the_file(tmp_path):
    with pytest.raises(DataError, match="registry not found"):
        load_registry(tmp_path / "missing")
    with pytest.raises(DataError, match="holds no"):
        load_registry(tmp_path)
    first = write(tmp_path, "a.yaml", [entry("alpha")])
    second = write(tmp_path, "b.yaml", [entry("alpha")])
    with pytest.raises(DataError, match=f"{second}: category 'alpha' is already defined in {first}"):
        load_registry(tmp_path)


def test_fingerprints_follow_definition_and_text(tmp_path):
    text = tmp_path / "texts" / "legal.txt"
    text.parent.mkdir()
    text.write_text("The party of the first part agrees.\n\nThe court finds for the plaintiff.\n")
    write(tmp_path / "reg", "legal.yaml", [entry("legal", str(text))])
    write(tmp_path / "reg", "news.yaml", [entry("news")])
    first = registry_fingerprints(load_registry(tmp_path / "reg"))
    assert registry_fingerprints(load_registry(tmp_path / "reg")) == first  # stable

    text.write_text(text.read_text() + "\nA new judgment.\n")
    second = registry_fingerprints(load_registry(tmp_path / "reg"))
    assert second["legal"] != first["legal"] and second["news"] == first["news"]

    write(tmp_path / "reg", "news.yaml", [{**entry("news"), "description": "ABC news, edited"}])
    third = registry_fingerprints(load_registry(tmp_path / "reg"))
    assert third["news"] != second["news"]


def test_diff():
    diff = diff_registry({"a": "1", "b": "2", "c": "3"}, {"a": "1", "b": "9", "d": "4"})
    assert (diff.added, diff.removed, diff.changed) == (["d"], ["c"], ["b"])
    assert diff.events() == [("added", "d"), ("removed", "c"), ("changed", "b")]
    assert not diff_registry({"a": "1"}, {"a": "1"})
