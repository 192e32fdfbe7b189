"""Tests of icm_core.data.text: whitespace normalisation."""

from __future__ import annotations

from icm_core.data.text import normalise_text


def test_normalise_text() -> None:
    assert normalise_text("a\r\n\r\n\r\n\r\nb  \n") == "a\n\nb"
    assert normalise_text("def f():\n    return 1\n") == "def f():\n    return 1"
    assert normalise_text("word ,  other   word .", prose=True) == "word, other word."
