"""Manual pages (roff) → plain text with mandoc, Debian's man-page formatter, plus a short clean-up.

mandoc is not installed on the machine: `fetch_mandoc` downloads Debian's `mandoc` package with
`apt-get download` and unpacks it with `dpkg -x`, like the corpora it converts. It lays each page
out for a terminal 1000 columns wide (`mandoc -T utf8 -O width=1000`, its maximum), so a
paragraph is one line; `clean_mandoc_output` then removes what is terminal layout, not text:

- bold and underline drawn by overstriking (`c\\bc`, `_\\bc`) → the character (as `col -b`);
- the page header and footer (first and last line);
- every line's indentation (the nesting of lists and examples), and trailing blanks;
- paragraphs longer than 1000 columns, which mandoc wrapped, are joined again;
- tbl box rules are dropped and cells separated by `│` become tab-separated;
- no-break spaces (`\\ `) → spaces, the two spaces mandoc puts after a sentence → one,
  `•   item` → `• item`;
- the sections named in `drop_sections` (a section is a heading line at column 0 and what
  follows it up to the next heading).
"""

from __future__ import annotations

import re
import subprocess
from collections import Counter
from collections.abc import Collection
from pathlib import Path

from matt.assets.sources import AssetError, apt_download, deb_extract

__all__ = ["MANDOC_ARGS", "WIDTH", "clean_mandoc_output", "fetch_mandoc", "run_mandoc"]

WIDTH = 1000  # columns; mandoc refuses more
MANDOC_ARGS = ("-K", "utf-8", "-T", "utf8", "-O", f"width={WIDTH}", "-W", "error")

_OVERSTRIKE = re.compile(r".\x08")
_TABLE_RULE = re.compile(r"[─│┌┐└┘├┤┬┴┼\s]+")
_SENTENCE_END = re.compile(r"([.!?][\"')\]’”»]*) {2}(?=\S)")
_BULLET = re.compile(r"^([•●○◦▪■]) {2,}(?=\S)")
_MESSAGE = re.compile(r"^mandoc: <stdin>:\d+:\d+: ([A-Z]+): ")


def fetch_mandoc(downloads: Path, work: Path) -> tuple[Path, str]:
    """The `mandoc` executable unpacked from Debian's package (fetched into `downloads`), and the
    package version."""
    deb = apt_download("mandoc", downloads)
    unpacked, version = deb_extract(deb, work / "mandoc")
    binary = unpacked / "usr" / "bin" / "mandoc"
    if not binary.is_file():
        raise AssetError(f"{deb.name} has no usr/bin/mandoc")
    return binary, version


def run_mandoc(mandoc: Path, source: str, *, page: str, cwd: Path) -> tuple[str, Counter]:
    """mandoc's terminal output for one page, and its messages counted by level (ERROR, UNSUPP).

    `cwd` is the manual's root, which `.so man1/other.1` includes are relative to. mandoc still
    formats a page it reports errors in; only a failure to run (exit status 5 or more: bad
    arguments, system error) raises, naming the page.
    """
    try:
        result = subprocess.run([str(mandoc), *MANDOC_ARGS], input=source.encode("utf-8"),
                                capture_output=True, cwd=cwd, check=False)
    except OSError as error:
        raise AssetError(f"cannot run {mandoc} on {page}: {error}") from error
    stderr = result.stderr.decode("utf-8", errors="replace")
    if result.returncode >= 5 or not result.stdout.strip():
        raise AssetError(f"mandoc failed on {page} (exit {result.returncode}):\n"
                         + "\n".join(stderr.strip().splitlines()[-12:]))
    levels = Counter(m.group(1) for m in map(_MESSAGE.match, stderr.splitlines()) if m)
    return result.stdout.decode("utf-8"), levels


def clean_mandoc_output(output: str, *, drop_sections: Collection[str] = ()) -> str:
    """Plain text of one page from `mandoc -T utf8 -O width=1000` output (see the module doc)."""
    output = _OVERSTRIKE.sub("", output).replace("\u00a0", " ").strip()
    body = [line.rstrip() for line in output.split("\n")][1:-1]  # without the header and footer lines

    kept: list[str] = []  # still indented: a wrapped line is recognised by its columns
    dropping = False
    for line in body:
        if line and not line[0].isspace():  # a section heading
            dropping = line in drop_sections
        if dropping:
            continue
        previous = kept[-1] if kept else ""
        if (line and previous and "│" not in line + previous
                and len(previous) + 1 + len(line.split()[0]) > WIDTH):
            kept[-1] = f"{previous} {line.lstrip()}"  # mandoc wrapped here: the word did not fit
            continue
        kept.append(line)

    text_lines = []
    for line in kept:
        if line and _TABLE_RULE.fullmatch(line):
            continue
        if line and not line[0].isspace() and text_lines and text_lines[-1]:
            text_lines.append("")  # a heading starts a paragraph, even right after a table
        line = line.strip()
        if "│" in line:
            line = "\t".join(cell.strip() for cell in line.strip("│").split("│")).rstrip("\t")
        line = _BULLET.sub(r"\1 ", _SENTENCE_END.sub(r"\1 ", line))
        text_lines.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(text_lines)).strip("\n")
