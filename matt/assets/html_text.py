"""Sphinx HTML pages (Debian's python3.11-doc) → clean plain text, with the stdlib parser.

Only the page body (`<div role="main">`, or `<body>` when a page has none) is kept; navigation,
sidebars, scripts, permalink pilcrows and the search box are dropped. Block elements end lines,
filled text is whitespace-collapsed, `<pre>` keeps its layout, list items get a bullet and table
rows become tab-separated lines.
"""

from __future__ import annotations

import re
import unicodedata
from html.parser import HTMLParser

__all__ = ["html_to_text"]

_BLOCK = {"p", "div", "section", "article", "blockquote", "h1", "h2", "h3", "h4", "h5", "h6",
          "ul", "ol", "dl", "dt", "dd", "li", "table", "thead", "tbody", "tr", "pre", "figure",
          "figcaption", "caption", "hr", "form", "header", "footer", "main", "aside", "details",
          "summary", "address", "center"}
_PARAGRAPH = {"p", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "table", "blockquote", "dl", "ul",
              "ol", "figure"}
_SKIP = {"script", "style", "noscript", "nav", "head", "title", "button", "select", "textarea",
         "svg", "template", "iframe", "object", "form"}
_SKIP_CLASSES = {"headerlink", "sphinxsidebar", "related", "footer", "mobile-nav", "clearer",
                 "sphinxsidebarwrapper", "searchbox", "inline-search", "toctree-wrapper-hidden",
                 "copybutton"}
_VOID = {"br", "hr", "img", "input", "meta", "link", "area", "base", "col", "embed", "source",
         "track", "wbr", "param"}


class _Extractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, bool, bool]] = []  # (tag, skipping, is_main)
        self.skip_depth = 0
        self.pre_depth = 0
        self.lines: list[str] = []  # where text goes now: the page body, or the main part once open
        self.main_lines: list[str] | None = None  # the first `role="main"` element's lines
        self.current: list[str] = []
        self.cell_index = 0

    # structure ------------------------------------------------------------------------------
    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = dict(attrs)
        classes = set((attr.get("class") or "").split())
        skipping = tag in _SKIP or bool(classes & _SKIP_CLASSES) or attr.get("role") == "navigation"
        is_main = attr.get("role") == "main" and self.main_lines is None
        if tag in _VOID:
            if tag == "br" and not self.skip_depth:
                self._break()
            elif tag == "img" and not self.skip_depth and attr.get("alt"):
                self.current.append(attr["alt"])
            return
        self.stack.append((tag, skipping, is_main))
        if skipping:
            self.skip_depth += 1
        if is_main:
            self._break()
            self.lines = self.main_lines = []
        if self.skip_depth:
            return
        if tag in _PARAGRAPH:
            self._paragraph()
        elif tag in _BLOCK:
            self._break()
        if tag == "pre":
            self.pre_depth += 1
        elif tag == "tr":
            self.cell_index = 0
        elif tag in ("td", "th"):
            if self.cell_index:
                self.current.append("\t")
            self.cell_index += 1
        elif tag == "li":
            self.current.append("• ")

    def handle_endtag(self, tag: str) -> None:
        if tag in _VOID:
            return
        # close up to the matching open tag (HTML in the wild is not always well nested)
        for k in range(len(self.stack) - 1, -1, -1):
            if self.stack[k][0] == tag:
                break
        else:
            return
        while len(self.stack) > k:
            open_tag, skipping, is_main = self.stack.pop()
            if not self.skip_depth:
                if open_tag == "pre":
                    self._break()  # flush while still inside <pre>: its layout is kept
                    self.pre_depth -= 1
                if open_tag in _PARAGRAPH:
                    self._paragraph()
                elif open_tag in _BLOCK:
                    self._break()
            if skipping:
                self.skip_depth -= 1
            if is_main:
                self._break()
                self.lines = []  # what follows the main part is not kept

    def handle_data(self, data: str) -> None:
        if self.skip_depth:
            return
        self.current.append(data if self.pre_depth else re.sub(r"\s+", " ", data))

    # output ---------------------------------------------------------------------------------
    def _break(self) -> None:
        if not self.current or self._only_bullet():
            return  # a list item's bullet waits for the item's first text
        text = "".join(self.current)
        self.current = []
        if self.pre_depth:
            self.lines.extend(line.rstrip() for line in text.split("\n"))
            return
        line = "\t".join(re.sub(r" +", " ", cell).strip() for cell in text.split("\t")).rstrip("\t")
        if line.strip():
            self.lines.append(line)

    def _only_bullet(self) -> bool:
        return "".join(self.current).strip() == "•"

    def _paragraph(self) -> None:
        self._break()
        if self._only_bullet():
            return
        if self.lines and self.lines[-1] != "":
            self.lines.append("")

    def text(self) -> str:
        self._break()
        out = "\n".join(self.lines if self.main_lines is None else self.main_lines)
        out = re.sub(r"\n{3,}", "\n\n", out).strip("\n")
        return unicodedata.normalize("NFC", out.replace("\u00a0", " "))


def html_to_text(html: str) -> str:
    """Plain text of the main content of one HTML page."""
    parser = _Extractor()
    parser.feed(html)
    parser.close()
    return parser.text()
