"""MediaWiki: turn a pages-articles XML dump into plain-text articles (markup parser and dump reader).

:func:`strip_wiki_markup` renders wikitext as plain text; :func:`mediawiki_documents` walks a
(bz2-compressed) dump and yields one ``title + text`` document per article, skipping redirects,
disambiguation pages, other namespaces and stubs.
"""

from __future__ import annotations

import bz2
import html
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from icm_core.data.text import normalise_text


__all__ = ["mediawiki_documents", "strip_wiki_markup"]

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


def mediawiki_documents(path: Path) -> Iterator[str]:
    """Articles of a MediaWiki XML dump (``.bz2`` or plain), as ``title\\n\\ntext``, in dump order."""
    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rb") as handle:
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
