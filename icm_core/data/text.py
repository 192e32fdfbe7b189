"""Plain-text helpers every text source shares: the data error type, UTF-8 decoding, whitespace normalisation.

Nothing here knows about categories or corpora; :mod:`icm_core.data.corpora`, :mod:`icm_core.data.categories`,
:mod:`icm_core.data.splits` and :mod:`icm_core.data.tokens` build on it.
"""

from __future__ import annotations

import re
from pathlib import Path


__all__ = ["DataError", "decode_utf8", "normalise_text", "read_utf8"]


class DataError(ValueError):
    """Category text is missing, unreadable, malformed or too small. The message names the file or category."""


def decode_utf8(data: bytes, path: str | Path) -> str:
    """Decode UTF-8 bytes read from ``path`` (named in the error), dropping a byte-order mark.

    Raises:
        DataError: The bytes are not UTF-8; the message names the file and the byte offset.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}: not valid UTF-8 at byte offset {exc.start} (byte 0x{data[exc.start]:02x}); "
            "convert the file to UTF-8"
        ) from exc
    return text.removeprefix("\ufeff")


def read_utf8(path: Path) -> str:
    """Read a UTF-8 text file (see :func:`decode_utf8`)."""
    return decode_utf8(path.read_bytes(), path)


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
