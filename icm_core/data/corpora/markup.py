"""HTML to plain text for documentation pages: headings and paragraphs become lines, ``<pre>`` keeps its layout."""

from __future__ import annotations

import re
from html.parser import HTMLParser


__all__ = ["html_to_text"]

_SKIP = {"script", "style", "head", "title", "nav", "noscript", "svg", "button", "select"}
_BLOCK = {
    "p", "div", "br", "h1", "h2", "h3", "h4", "h5", "h6", "li", "ul", "ol", "dl", "dt", "dd", "table", "tr",
    "pre", "blockquote", "section", "article", "header", "footer", "hr", "td", "th", "caption", "figure",
}  # fmt: skip


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0
        self.pre = 0

    def handle_starttag(self, tag: str, attrs) -> None:  # noqa: ANN001 - HTMLParser signature
        if tag in _SKIP:
            self.skip += 1
        elif tag == "pre":
            self.pre += 1
            self.parts.append("\n\n")
        elif tag in _BLOCK:
            self.parts.append("\n\n" if tag in ("p", "h1", "h2", "h3", "h4", "h5", "h6", "table", "dl") else "\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP:
            self.skip = max(0, self.skip - 1)
        elif tag == "pre":
            self.pre = max(0, self.pre - 1)
            self.parts.append("\n\n")
        elif tag in _BLOCK:
            self.parts.append("\n")
        elif tag in ("td", "th"):
            self.parts.append(" ")

    def handle_data(self, data: str) -> None:
        if self.skip:
            return
        self.parts.append(data if self.pre else re.sub(r"\s+", " ", data))


def html_to_text(markup: str) -> str:
    """Visible text of an HTML page: scripts, styles, the head and navigation dropped; block elements end lines;
    runs of whitespace outside ``<pre>`` collapse to one space; ``<pre>`` blocks keep their lines and indentation.

    Args:
        markup: An HTML document.

    Returns:
        Its text, lines stripped on the right and left outside code blocks, at most one blank line in a row.
    """
    parser = _TextExtractor()
    parser.feed(markup)
    parser.close()
    lines = [line.rstrip() for line in "".join(parser.parts).split("\n")]
    text = "\n".join(line if line.startswith("  ") and line.strip() else line.strip() for line in lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()
