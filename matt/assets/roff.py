"""roff manual pages (man and mdoc macros) → clean plain text, in pure Python.

Why not groff: the corpus must come out byte-identical on every machine (groff may be missing or
another version), and language-model text wants each filled paragraph on one line, with no
hyphenation, justification, indentation or page furniture — the opposite of a typesetter's job.
So this is a small roff interpreter: it runs the requests that decide *which* text a page
prints (macro/string/register definitions, conditionals, ignore blocks, includes), renders the
man and mdoc macros as paragraphs, headings, tags and list items, turns escapes into Unicode and
drops everything typographic (fonts, sizes, motions, colours). tbl tables become one line per
row with tab-separated cells. Anything it cannot interpret is counted in a `RoffReport`, never
passed through as markup. `tests/test_assets.py` checks it construct by construct and, on the
real corpus, against groff's own rendering.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

__all__ = ["RoffReport", "roff_to_text"]

_JOIN = "\x00"  # `\c`: the next input text continues this output line without a space
_MAX_EXPANSIONS = 20000

# Named glyphs (`\(xx`, `\[name]`) — groff_char(7), the ones manual pages use.
_GLYPHS = {
    "em": "—", "en": "–", "hy": "-", "mi": "-", "-": "-", "aq": "'", "dq": '"', "lq": "“",
    "rq": "”", "oq": "‘", "cq": "’", "Bq": "„", "bq": "‚", "Fo": "«", "Fc": "»", "fo": "‹",
    "fc": "›", "bu": "•", "ci": "○", "sq": "□", "co": "©", "rg": "®", "tm": "™", "de": "°",
    "ti": "~", "ha": "^", "ga": "`", "aa": "´", "ul": "_", "rn": "‾", "sl": "/", "rs": "\\",
    "ba": "|", "br": "│", "or": "|", "bv": "|", "lB": "[", "rB": "]", "lC": "{", "rC": "}",
    "la": "⟨", "ra": "⟩", "mu": "×", "di": "÷", "+-": "±", "-+": "∓", "<=": "≤", ">=": "≥",
    "!=": "≠", "==": "≡", "=~": "≅", "~~": "≈", "ap": "∼", "->": "→", "<-": "←", "<>": "↔",
    "da": "↓", "ua": "↑", "rA": "⇒", "lA": "⇐", "hA": "⇔", "uA": "⇑", "dA": "⇓", "if": "∞",
    "sc": "§", "ps": "¶", "dg": "†", "dd": "‡", "ct": "¢", "Eu": "€", "eu": "€", "Po": "£",
    "Ye": "¥", "Cs": "¤", "ss": "ß", "AE": "Æ", "ae": "æ", "OE": "Œ", "oe": "œ", "/O": "Ø",
    "/o": "ø", "-D": "Đ", "Sd": "ð", "TP": "Þ", "Tp": "þ", "r!": "¡", "r?": "¿", "pl": "+",
    "eq": "=", "lh": "☜", "rh": "☞", "at": "@", "sh": "#", "Do": "$", "pc": "·", "md": "⋅",
    "fm": "′", "sd": "″", "sr": "√", "pd": "∂", "gr": "∇", "no": "¬", "tf": "∴", "es": "∅",
    "mo": "∈", "nm": "∉", "sb": "⊂", "sp": "⊃", "ca": "∩", "cu": "∪", "AN": "∧", "OR": "∨",
    "fa": "∀", "te": "∃", "is": "∫", "sum": "∑", "product": "∏", "12": "½", "14": "¼",
    "34": "¾", "S1": "¹", "S2": "²", "S3": "³", "Of": "ª", "Om": "º", "a-": "¯", "a.": "˙",
    "a^": "^", "a~": "~", "ab": "˘", "ac": "¸", "ad": "¨", "ah": "ˇ", "ao": "˚", "ho": "˛",
    "a\"": "˝", "en-dash": "–", "em-dash": "—", "lq'": "“", "tno": "¬", "nbsp": " ",
    "space": " ", "char92": "\\", "char34": '"', "char39": "'", "char45": "-", "char46": ".",
    "char96": "`", "shc": "", "vs": "", "st": "∋", "Im": "ℑ", "Re": "ℜ", "wp": "℘", "Ah": "ℵ",
    "mc": "µ", "OK": "✓", "CR": "↵", "ts": "ς", "ff": "ﬀ", "fi": "ﬁ", "fl": "ﬂ", "Fi": "ﬃ", "Fl": "ﬄ",
}
_GREEK = dict(zip("abgdezyhiklmncoprstufxqw", "αβγδεζηθικλμνξοπρστυφχψω"))
_ACCENTS = {":": "\u0308", "'": "\u0301", "`": "\u0300", "^": "\u0302", "~": "\u0303",
            ",": "\u0327", "v": "\u030c", "o": "\u030a", "u": "\u0306", "-": "\u0304",
            ".": "\u0307", "\"": "\u030b"}

# Escapes whose argument is delimited ('...', |...|): motions, widths, drawing, device control.
_DELIMITED_ESCAPES = set("hvwxlLobDXZRHSNABTUY")
# Escapes taking a one-character, `(xx` or `[name]` argument that prints nothing.
_NAME_ESCAPES = set("fFgkjmMVOn*$Y")
_SILENT_ESCAPES = set("&)%:^|/,{}pr udat!?E")
_MDOC_CALLABLE = {
    "Ac", "Ad", "An", "Ao", "Ap", "Aq", "Ar", "At", "Bc", "Bo", "Bq", "Brc", "Bro", "Brq",
    "Bsx", "Bx", "Cd", "Cm", "Dc", "Do", "Dq", "Dv", "Dx", "Ec", "Em", "En", "Eo", "Er", "Es",
    "Ev", "Fa", "Fc", "Fl", "Fn", "Fo", "Fr", "Ft", "Fx", "Ic", "In", "Lk", "Li", "Ms", "Mt",
    "Nm", "No", "Ns", "Nx", "Oc", "Oo", "Op", "Ox", "Pa", "Pc", "Pf", "Po", "Pq", "Qc", "Ql",
    "Qo", "Qq", "Sc", "So", "Sq", "St", "Sx", "Sy", "Ta", "Tn", "Ux", "Va", "Vt", "Xc", "Xo",
    "Xr",
}
_MDOC_WORD_MACROS = {"Ad", "An", "Cd", "Cm", "Dv", "Em", "Er", "Ev", "Fa", "Fr", "Ft", "Ic",
                     "Li", "Ms", "No", "Sx", "Sy", "Tn", "Va", "Vt", "Ar", "Pa", "Fl", "Nm"}
_MDOC_ENCLOSE = {"Aq": ("⟨", "⟩"), "Bq": ("[", "]"), "Brq": ("{", "}"), "Dq": ("“", "”"),
                 "Op": ("[", "]"), "Pq": ("(", ")"), "Qq": ('"', '"'), "Sq": ("‘", "’"),
                 "Ql": ("‘", "’")}
_MDOC_OPEN = {"Ao": "⟨", "Bo": "[", "Bro": "{", "Do": "“", "Oo": "[", "Po": "(", "Qo": '"',
              "So": "‘"}
_MDOC_CLOSE = {"Ac": "⟩", "Bc": "]", "Brc": "}", "Dc": "”", "Oc": "]", "Pc": ")", "Qc": '"',
               "Sc": "’"}
_MDOC_FIXED = {"Ux": "UNIX", "Bx": "BSD", "At": "AT&T UNIX", "Nx": "NetBSD", "Fx": "FreeBSD",
               "Ox": "OpenBSD", "Dx": "DragonFly", "Bsx": "BSD/OS"}
_MDOC_STANDARDS = {"-p1003.1": "IEEE Std 1003.1 (“POSIX.1”)", "-p1003.2": "IEEE Std 1003.2 (“POSIX.2”)",
                   "-ansiC": "ANSI X3.159-1989 (“ANSI C89”)", "-isoC": "ISO/IEC 9899:1990 (“ISO C90”)",
                   "-isoC-99": "ISO/IEC 9899:1999 (“ISO C99”)", "-susv2": "Version 2 of the Single UNIX Specification (“SUSv2”)",
                   "-susv3": "Version 3 of the Single UNIX Specification (“SUSv3”)",
                   "-xpg4": "X/Open Portability Guide Issue 4 (“XPG4”)"}
_CLOSE_DELIMS = {".", ",", ":", ";", ")", "]", "?", "!"}
_OPEN_DELIMS = {"(", "["}
_REFERENCE_FIELDS = ("%A", "%T", "%B", "%J", "%R", "%I", "%Q", "%C", "%V", "%N", "%P", "%D",
                     "%O", "%U")

# Requests that only change typography or page layout.
_IGNORED_REQUESTS = {
    "ad", "na", "nh", "hy", "hw", "hc", "hla", "hlm", "hym", "hys", "ll", "lt", "pl", "po", "ps",
    "vs", "ls", "ss", "cs", "bd", "ft", "fam", "fp", "fzoom", "ul", "cu", "uf", "lg", "kern",
    "ta", "tc", "lc", "fc", "mc", "nm", "nn", "ne", "mk", "rt", "ch", "wh", "it", "itc", "dt",
    "em", "ev", "evc", "pc", "pn", "pm", "tm", "tm1", "tmc", "ab", "lf", "cc", "c2", "eo", "ec",
    "ecs", "ecr", "warn", "warnscale", "color", "defcolor", "gcolor", "fcolor", "sv", "os", "ns",
    "rs", "mso", "do", "char", "fchar", "schar", "fschar", "rchar", "rfschar", "hcode", "shc",
    "sizes", "special", "fspecial", "ftr", "tkf", "trf", "cflags", "nroff", "troff", "vpt",
    "open", "opena", "close", "write", "writec", "writem", "pso", "psbb", "substring", "length",
    "chop", "index", "asciify", "unformat", "box", "boxa", "di", "da", "output", "return",
    "shift", "break", "continue", "pev", "pnr", "ptr", "fl", "linetabs", "rj", "trin",
    "trnt", "spreadwarn", "blm", "lsm", "brp", "DT", "UC", "AT", "IX", "LINKSTYLE", "PU", "af",
    "aln", "rnn", "hpf", "hpfa", "hpfcode", "sty", "cp",
}
_BREAKING_REQUESTS = {"br", "bp", "fi", "nf", "in", "ti", "ce", "rj"}


@dataclass
class RoffReport:
    """What the converter met and did not turn into text (per document or summed)."""

    tables: int = 0
    table_rows: int = 0
    includes_resolved: int = 0
    includes_skipped: int = 0
    sections_dropped: int = 0
    unknown_macros: Counter = field(default_factory=Counter)
    unknown_glyphs: Counter = field(default_factory=Counter)
    unknown_escapes: Counter = field(default_factory=Counter)

    def add(self, other: RoffReport) -> None:
        self.tables += other.tables
        self.table_rows += other.table_rows
        self.includes_resolved += other.includes_resolved
        self.includes_skipped += other.includes_skipped
        self.sections_dropped += other.sections_dropped
        self.unknown_macros.update(other.unknown_macros)
        self.unknown_glyphs.update(other.unknown_glyphs)
        self.unknown_escapes.update(other.unknown_escapes)

    def as_dict(self) -> dict:
        return {"tables": self.tables, "table_rows": self.table_rows,
                "includes_resolved": self.includes_resolved,
                "includes_skipped": self.includes_skipped,
                "sections_dropped": self.sections_dropped,
                "unknown_macros": dict(self.unknown_macros.most_common()),
                "unknown_glyphs": dict(self.unknown_glyphs.most_common()),
                "unknown_escapes": dict(self.unknown_escapes.most_common())}


def roff_to_text(source: str, *, include: Callable[[str], str | None] | None = None,
                 drop_sections: Collection[str] = (), report: RoffReport | None = None) -> str:
    """Plain text of one manual page.

    `include(path)` returns the text of a `.so path` include, or None to skip it (counted).
    Top-level sections whose heading is in `drop_sections` are left out (counted).
    Counts of what could not be interpreted are added to `report` when given.
    """
    interp = _Interpreter(include=include, drop_sections=frozenset(drop_sections))
    text = interp.run(source)
    interp.report.sections_dropped += interp.out.dropped
    if report is not None:
        report.add(interp.report)
    return text


# --------------------------------------------------------------------------------------------
# input: logical lines, arguments
# --------------------------------------------------------------------------------------------

def _logical_lines(source: str) -> list[str]:
    """Strip `\\"`/`\\#` comments and join `\\`-continued lines, as troff reads its input."""
    out: list[str] = []
    pending = ""
    for raw in source.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        line, joins = _strip_comment(raw)
        line = pending + line
        if joins:
            pending = line
            continue
        trailing = len(line) - len(line.rstrip("\\"))
        if trailing % 2 == 1:
            pending = line[:-1]
            continue
        pending = ""
        out.append(line)
    if pending:
        out.append(pending)
    return out


def _strip_comment(line: str) -> tuple[str, bool]:
    i = 0
    while i < len(line):
        if line[i] == "\\" and i + 1 < len(line):
            nxt = line[i + 1]
            if nxt == '"':
                return line[:i].rstrip(" \t") if _is_control(line[:i]) else line[:i], False
            if nxt == "#":
                return line[:i], True
            i += 2
            continue
        i += 1
    return line, False


def _is_control(line: str) -> bool:
    return line[:1] in (".", "'")


def _split_args(text: str) -> list[tuple[str, bool]]:
    """Macro arguments: blank-separated, `"quoted"` ones may hold blanks (`""` = a quote)."""
    args: list[tuple[str, bool]] = []
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i] in " \t":
            i += 1
        if i >= n:
            break
        if text[i] == '"':
            i += 1
            buf = []
            while i < n:
                c = text[i]
                if c == "\\" and i + 1 < n:
                    buf.append(text[i:i + 2])
                    i += 2
                    continue
                if c == '"':
                    if i + 1 < n and text[i + 1] == '"':
                        buf.append('"')
                        i += 2
                        continue
                    i += 1
                    break
                buf.append(c)
                i += 1
            args.append(("".join(buf), True))
        else:
            buf = []
            while i < n and text[i] not in " \t":
                if text[i] == "\\" and i + 1 < n:
                    buf.append(text[i:i + 2])
                    i += 2
                    continue
                buf.append(text[i])
                i += 1
            args.append(("".join(buf), False))
    return args


def _read_name(s: str, i: int) -> tuple[str, int]:
    """Name after an escape such as `\\*`, `\\n`, `\\f`: `x`, `(xy` or `[long name]`."""
    if i >= len(s):
        return "", i
    if s[i] == "(":
        return s[i + 1:i + 3], i + 3
    if s[i] == "[":
        end = s.find("]", i)
        if end < 0:
            return s[i + 1:], len(s)
        return s[i + 1:end], end + 1
    return s[i], i + 1


def _read_delimited(s: str, i: int) -> tuple[str, int]:
    """Argument of `\\h'...'`-style escapes; the delimiter is whatever character follows."""
    if i >= len(s):
        return "", i
    delim = s[i]
    if delim == "[":
        end = s.find("]", i)
        return (s[i + 1:end], end + 1) if end >= 0 else (s[i + 1:], len(s))
    j = i + 1
    while j < len(s):
        if s[j] == "\\" and j + 1 < len(s):
            j += 2
            continue
        if s[j] == delim:
            return s[i + 1:j], j + 1
        j += 1
    return s[i + 1:], len(s)


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------

class _Writer:
    """Collects output lines: filled paragraphs become one line each, no-fill text stays as is."""

    def __init__(self, drop_sections: frozenset[str] = frozenset()) -> None:
        self.lines: list[str] = []
        self.current: list[str] = []
        self.drop_sections = drop_sections
        self.suppress = False  # inside a dropped section: nothing is written
        self.dropped = 0
        self.fill = True
        self.join_next = False
        self.emitted = 0  # text pieces written so far (to tell whether a link had text)
        self.heading_end = -1

    def add(self, text: str) -> None:
        joined = text.endswith(_JOIN)
        text = text.replace(_JOIN, "")
        if self.join_next and self.current:
            self.current[-1] += text
        elif text or not self.fill:
            self.current.append(text)
        self.join_next = joined
        self.emitted += 1
        if not self.fill and not joined:
            self._flush(keep_blank=True)

    def blank_input_line(self) -> None:
        if self.fill:
            self.paragraph()
        else:
            self.add("")

    def br(self) -> None:
        self.join_next = False
        self._flush(keep_blank=False)

    def paragraph(self) -> None:
        self.br()
        if self.suppress:
            return
        if self.lines and self.lines[-1] != "" and len(self.lines) != self.heading_end:
            self.lines.append("")

    def heading(self, text: str, level: int = 1) -> None:
        """A heading line; the section's first paragraph follows it without a blank line."""
        self.paragraph()
        text = _clean_line(text)
        if level == 1:
            self.suppress = text in self.drop_sections
            self.dropped += self.suppress
        if text and not self.suppress:
            self.lines.append(text)
            self.heading_end = len(self.lines)

    def raw_line(self, text: str) -> None:
        """A line written as is (table rows keep their tab-separated cells)."""
        self.br()
        if not self.suppress:
            self.lines.append(text)

    def _flush(self, keep_blank: bool) -> None:
        if not self.current:
            return
        if self.fill:
            line = _clean_line(" ".join(self.current))
        else:
            line = "".join(self.current).rstrip()
        self.current = []
        if (line or keep_blank) and not self.suppress:
            self.lines.append(line)

    def text(self) -> str:
        self.br()
        out = "\n".join(self.lines)
        out = re.sub(r"\n{3,}", "\n\n", out)
        return out.strip("\n")


def _clean_line(line: str) -> str:
    return re.sub(r"[ \t\u00a0]+", " ", line).strip()


# --------------------------------------------------------------------------------------------
# the interpreter
# --------------------------------------------------------------------------------------------

class _Interpreter:
    def __init__(self, include: Callable[[str], str | None] | None,
                 drop_sections: frozenset[str] = frozenset()) -> None:
        self.include = include
        self.report = RoffReport()
        self.macros: dict[str, list[str]] = {}
        self.strings: dict[str, str] = dict(_PREDEFINED_STRINGS)
        # `.g` = 1: pages take their groff branches, the ones every Linux system renders
        self.registers: dict[str, int] = {".g": 1, ".H": 1, ".V": 1, ".$": 0}
        self.translations: dict[str, str] = {}
        self.out = _Writer(drop_sections)
        self.stack: list[str] = []
        self.else_stack: list[bool] = []
        self.expansions = 0
        self.pending: str | None = None  # "heading1/2" or "tag": what the next text line is
        self.heading_level = 1
        self.pd_zero = False
        self.links: list[tuple[str, int]] = []
        # mdoc state
        self.name = ""
        self.lists: list[dict] = []
        self.spacing = True
        self.sm_started = False
        self.xo_open = False
        self.reference: list[tuple[str, str]] | None = None
        self.display_stack: list[bool] = []

    # ---- driver ----------------------------------------------------------------------------

    def run(self, source: str) -> str:
        self._push(_logical_lines(source))
        self._loop()
        text = self.out.text()
        if self.translations:
            text = text.translate(str.maketrans(self.translations))
        return unicodedata.normalize("NFC", text.replace(_JOIN, ""))

    def _push(self, lines: list[str]) -> None:
        self.stack.extend(reversed(lines))

    def _next_raw(self) -> str | None:
        return self.stack.pop() if self.stack else None

    def _loop(self) -> None:
        while self.stack:
            self._line(self.stack.pop())

    def _line(self, line: str) -> None:
        if _is_control(line):
            self._control(line)
        else:
            self._text_line(line)

    # ---- interpolation -----------------------------------------------------------------

    def _interpolate(self, s: str, depth: int = 0) -> str:
        """Replace `\\*` strings and `\\n` registers (troff does it as it reads a line)."""
        if "\\" not in s or depth > 8:
            return s
        out = []
        i, n = 0, len(s)
        changed = False
        while i < n:
            c = s[i]
            if c != "\\" or i + 1 >= n:
                out.append(c)
                i += 1
                continue
            e = s[i + 1]
            if e == "*":
                name, j = _read_name(s, i + 2)
                name = name.split(" ")[0]
                if name not in self.strings:
                    self.report.unknown_escapes[f"\\*[{name}]"] += 1
                out.append(self.strings.get(name, ""))
                i, changed = j, True
            elif e == "n":
                j = i + 2
                if j < n and s[j] in "+-":
                    j += 1
                name, j = _read_name(s, j)
                out.append(str(self.registers.get(name, 0)))
                i, changed = j, True
            else:
                out.append(s[i:i + 2])
                i += 2
        result = "".join(out)
        return self._interpolate(result, depth + 1) if changed else result

    # ---- escapes → text ----------------------------------------------------------------

    def _render(self, s: str) -> str:
        """Escapes to Unicode; fonts, sizes, motions and device controls dropped."""
        if "\\" not in s:
            return s
        out = []
        i, n = 0, len(s)
        while i < n:
            c = s[i]
            if c != "\\":
                out.append(c)
                i += 1
                continue
            if i + 1 >= n:
                i += 1
                continue
            e = s[i + 1]
            i += 2
            if e in "\\eE":
                out.append("\\")
            elif e == "-":
                out.append("-")
            elif e in " ~0":
                out.append(" ")
            elif e in "t\t":
                out.append("\t")
            elif e == ".":
                out.append(".")
            elif e == "'":
                out.append("'")
            elif e == "`":
                out.append("`")
            elif e == "c":
                out.append(_JOIN)
            elif e == "(":
                out.append(self._glyph(s[i:i + 2]))
                i += 2
            elif e == "[":
                name, i = _read_name(s, i - 1)
                out.append(self._glyph(name))
            elif e == "C":
                name, i = _read_delimited(s, i)
                out.append(self._glyph(name))
            elif e == "N":
                code, i = _read_delimited(s, i)
                out.append(chr(int(code)) if code.isdigit() and 32 <= int(code) < 0x110000 else "")
            elif e == "s":
                i = _skip_size(s, i)
            elif e == "z":
                pass  # zero-width: the next character still prints
            elif e in ("Z", "o"):
                arg, i = _read_delimited(s, i)
                rendered = self._render(arg)
                out.append(rendered if e == "Z" else rendered[:1])
            elif e == "w":
                _, i = _read_delimited(s, i)
                out.append("0")
            elif e in _DELIMITED_ESCAPES:
                _, i = _read_delimited(s, i)
            elif e in _NAME_ESCAPES:
                _, i = _read_name(s, i)
            elif e in _SILENT_ESCAPES:
                pass
            else:
                self.report.unknown_escapes["\\" + e] += 1
                out.append(e)
        return "".join(out)

    def _glyph(self, name: str) -> str:
        if name in _GLYPHS:
            return _GLYPHS[name]
        if name.startswith("*") and len(name) == 2 and name[1].lower() in _GREEK:
            g = _GREEK[name[1].lower()]
            return g.upper() if name[1].isupper() else g
        if re.fullmatch(r"u[0-9A-Fa-f]{4,6}(_[0-9A-Fa-f]{4,6})*", name):
            return unicodedata.normalize("NFC", "".join(chr(int(p.lstrip("u"), 16))
                                                         for p in name.split("_")))
        if len(name) == 2 and name[0] in _ACCENTS and name[1].isalpha():
            return unicodedata.normalize("NFC", name[1] + _ACCENTS[name[0]])
        if re.fullmatch(r"char\d+", name):
            return chr(int(name[4:]))
        if len(name) == 1:
            return name
        self.report.unknown_glyphs[name] += 1
        return ""

    # ---- text lines --------------------------------------------------------------------

    def _text_line(self, line: str) -> None:
        line = self._interpolate(line)
        if "\\{" in line or "\\}" in line:
            line = line.replace("\\{", "").replace("\\}", "")
        if not line.strip() and self.out.fill:
            if self.pending is None:
                self.out.blank_input_line()
            return
        if self.out.fill and line[:1] in " \t":
            self.out.br()  # a line starting with a blank breaks the filled paragraph
        self._emit(self._render(line))

    def _emit(self, text: str) -> None:
        """Write a piece of running text, honouring a pending heading / tag / list tag."""
        if self.pending and self.pending.startswith("heading"):
            level = int(self.pending[-1])
            self.pending = None
            self.out.heading(text, level)
            return
        self.out.add(text)
        if self.pending == "tag":
            self.pending = None
            self.out.br()

    # ---- requests and macros ------------------------------------------------------------

    def _control(self, line: str) -> None:
        m = re.match(r"^([.'])[ \t]*([^ \t\\]*)(.*)$", line)
        assert m is not None
        no_break = m.group(1) == "'"
        name, rest = m.group(2), m.group(3)
        if not name:
            return  # `.` alone, `.\}` closing a conditional block, or a stray escape
        if name in ("de", "am", "de1", "am1", "dei", "ami"):
            self._define(name, _split_args(rest))
            return
        if name == "ig":
            args = _split_args(rest)
            self._skip_until(args[0][0] if args else ".")
            return
        if name == "TS":
            self._table()
            return
        rest = self._interpolate(rest)
        if rest.endswith("\\}"):
            rest = rest[:-2]
        if name in self.macros:
            self._expand(name, rest)
            return
        if name in ("if", "ie", "el", "while"):
            self._conditional(name, rest)
            return
        handler = getattr(self, f"_req_{name}", None)
        if handler is not None:
            handler(rest, no_break)
            return
        if name in _MDOC_CALLABLE or name in _MDOC_LINE_MACROS:
            self._mdoc_line(name, _split_args(rest))
            return
        if name.startswith("%"):
            self._mdoc_reference_field(name, rest)
            return
        if name in _IGNORED_REQUESTS:
            return
        self.report.unknown_macros[name] += 1

    def _define(self, kind: str, args: list[tuple[str, bool]]) -> None:
        if not args:
            return
        name = args[0][0]
        end = args[1][0] if len(args) > 1 else "."
        body = []
        end_re = re.compile(r"^[.'][ \t]*" + re.escape(end) + r"[ \t]*$") if end != "." else \
            re.compile(r"^[.'][ \t]*\.[ \t]*$")
        while self.stack:
            raw = self.stack.pop()
            if end_re.match(raw):
                break
            body.append(_copy_mode(raw))
        if kind.startswith("am") and name in self.macros:
            self.macros[name].extend(body)
        else:
            self.macros[name] = body

    def _skip_until(self, end: str) -> None:
        end_re = re.compile(r"^[.'][ \t]*" + re.escape(end) + r"[ \t]*$")
        while self.stack:
            if end_re.match(self.stack.pop()):
                return

    def _expand(self, name: str, rest: str) -> None:
        self.expansions += 1
        if self.expansions > _MAX_EXPANSIONS:
            raise ValueError(f"roff: more than {_MAX_EXPANSIONS} macro expansions (runaway {name!r})")
        args = [a for a, _ in _split_args(rest)]

        def arg(m: re.Match) -> str:
            key = m.group(1) or m.group(2) or m.group(3)
            if key == "*":
                return " ".join(args)
            if key == "@":
                return " ".join(f'"{a}"' for a in args)
            if key == "0":
                return name
            idx = int(key)
            return args[idx - 1] if 0 < idx <= len(args) else ""

        pattern = re.compile(r"\\\$(?:\((\d\d)|\[(\d+)\]|([0-9*@]))")
        count = re.compile(r"\\n(?:\(\.\$|\[\.\$\])")
        lines = [count.sub(str(len(args)), pattern.sub(arg, body)) for body in self.macros[name]]
        self._push(lines)

    # conditionals ------------------------------------------------------------------------

    def _conditional(self, name: str, rest: str) -> None:
        if name == "el":
            take = not self.else_stack.pop() if self.else_stack else False
            body = rest
        else:
            result, body = self._condition(rest.lstrip(" \t"))
            if name == "ie":
                self.else_stack.append(result)
            take = result and name != "while"
        body = body.lstrip(" \t")
        if body.startswith("\\{"):
            body = body[2:]
            if not take:
                self._skip_block(body)
                return
        if take and body.strip():
            self._line(body)

    def _skip_block(self, first: str) -> None:
        depth = 1 + first.count("\\{") - first.count("\\}")
        while depth > 0 and self.stack:
            raw = self.stack.pop()
            depth += raw.count("\\{") - raw.count("\\}")

    def _condition(self, s: str) -> tuple[bool, str]:
        s = re.sub(r"\\w(.)(.*?)\1", lambda m: str(len(self._render(m.group(2)))), s)
        negate = False
        while s.startswith("!"):
            negate, s = not negate, s[1:]
        if not s:
            return negate, ""
        c = s[0]
        if c in "ntvoe" and (len(s) == 1 or not s[1].isalnum() or s[1] in " \t\\"):
            result = c == "n"  # we format for a terminal: nroff, not troff; no vroff
            return result != negate, s[1:]
        if c in "drmcFS" and len(s) > 1 and s[1] in " \t":
            arg, _, rest = s[1:].lstrip(" \t").partition(" ")
            if c == "d":
                result = arg in self.strings or arg in self.macros
            elif c == "r":
                result = arg in self.registers
            elif c == "m":
                result = False
            else:
                result = True
            return result != negate, rest
        if not (c.isdigit() or c in "(+-|") and not c.isalnum():
            # string comparison 'a'b'
            parts = s[1:].split(c, 2)
            if len(parts) >= 2:
                a, b = parts[0], parts[1]
                rest = parts[2] if len(parts) > 2 else ""
                return (self._render(a) == self._render(b)) != negate, rest
        expr, _, rest = s.partition(" ")
        return (self._evaluate(expr) > 0) != negate, rest

    def _evaluate(self, expr: str) -> int:
        """troff arithmetic: left to right, parentheses, comparisons, `:` or and `&` and."""
        tokens = re.findall(r"\d+(?:\.\d*)?[a-zA-Z]?|<=|>=|==|<>|[-+*/%<>=&:()]|\S", expr)
        pos = 0

        def term() -> int:
            nonlocal pos
            if pos >= len(tokens):
                return 0
            t = tokens[pos]
            pos += 1
            if t == "(":
                v = chain()
                if pos < len(tokens) and tokens[pos] == ")":
                    pos += 1
                return v
            if t == "-":
                return -term()
            if t == "+":
                return term()
            num = re.match(r"\d+(?:\.\d*)?", t)
            return int(float(num.group(0))) if num else 0

        def chain() -> int:
            nonlocal pos
            v = term()
            while pos < len(tokens) and tokens[pos] != ")":
                op = tokens[pos]
                pos += 1
                w = term()
                v = {"+": lambda: v + w, "-": lambda: v - w, "*": lambda: v * w,
                     "/": lambda: v // w if w else 0, "%": lambda: v % w if w else 0,
                     "<": lambda: int(v < w), ">": lambda: int(v > w),
                     "<=": lambda: int(v <= w), ">=": lambda: int(v >= w),
                     "=": lambda: int(v == w), "==": lambda: int(v == w),
                     "<>": lambda: int(v != w), "&": lambda: int(v > 0 and w > 0),
                     ":": lambda: int(v > 0 or w > 0)}.get(op, lambda: v)()
            return v

        try:
            return chain()
        except (ValueError, IndexError):
            return 0

    # roff requests -------------------------------------------------------------------------

    def _req_ds(self, rest: str, _nb: bool = False, append: bool = False) -> None:
        rest = rest.lstrip(" \t")
        name, _, value = rest.partition(" ")
        if not name:
            return
        value = value.lstrip(" \t")
        if value.startswith('"'):
            value = value[1:]
        value = _copy_mode(value)
        self.strings[name] = self.strings.get(name, "") + value if append else value

    def _req_as(self, rest: str, nb: bool = False) -> None:
        self._req_ds(rest, nb, append=True)

    def _req_nr(self, rest: str, _nb: bool = False) -> None:
        args = rest.split()
        if len(args) >= 2:
            value = args[1]
            if value[:1] in "+-" and args[0] in self.registers:
                self.registers[args[0]] += self._evaluate(value)
            else:
                self.registers[args[0]] = self._evaluate(value)

    def _req_rr(self, rest: str, _nb: bool = False) -> None:
        for name in rest.split():
            self.registers.pop(name, None)

    def _req_rm(self, rest: str, _nb: bool = False) -> None:
        for name in rest.split():
            self.macros.pop(name, None)
            self.strings.pop(name, None)

    def _req_als(self, rest: str, _nb: bool = False) -> None:
        args = rest.split()
        if len(args) == 2:
            new, old = args
            if old in self.macros:
                self.macros[new] = self.macros[old]
            elif old in self.strings:
                self.strings[new] = self.strings[old]

    def _req_rn(self, rest: str, _nb: bool = False) -> None:
        args = rest.split()
        if len(args) == 2 and args[0] in self.macros:
            self.macros[args[1]] = self.macros.pop(args[0])

    def _req_tr(self, rest: str, _nb: bool = False) -> None:
        chars = [self._render(g) for g in re.findall(r"\\\(..|\\\[[^\]]*\]|\\.|.", rest.strip())]
        for a, b in zip(chars[::2], chars[1::2] + [" "] * (len(chars) % 2)):
            if len(a) == 1:
                self.translations[a] = b

    def _req_so(self, rest: str, _nb: bool = False) -> None:
        path = rest.strip()
        text = self.include(path) if self.include is not None else None
        if text is None:
            self.report.includes_skipped += 1
            return
        self.report.includes_resolved += 1
        self._push(_logical_lines(text))

    def _req_nx(self, rest: str, _nb: bool = False) -> None:
        self.stack.clear()

    _req_ex = _req_nx

    def _req_br(self, rest: str, no_break: bool) -> None:
        if not no_break:
            self.out.br()

    _req_bp = _req_br
    _req_in = _req_br
    _req_ti = _req_br
    _req_ce = _req_br
    _req_rj = _req_br

    def _req_sp(self, rest: str, no_break: bool) -> None:
        if not no_break:
            self.out.paragraph()

    def _req_fi(self, rest: str, no_break: bool) -> None:
        self.out.br()
        self.out.fill = True

    def _req_nf(self, rest: str, no_break: bool) -> None:
        self.out.br()
        self.out.fill = False

    # man macros ---------------------------------------------------------------------------

    def _req_TH(self, rest: str, _nb: bool) -> None:
        self.out.br()

    def _req_SH(self, rest: str, _nb: bool = False) -> None:
        self.pending = None
        self.pd_zero = False
        self._leave_link()
        if self.out.fill is False:
            self.out.br()
            self.out.fill = True
        args = [a for a, _ in _split_args(rest)]
        if args:
            self.out.heading(self._render(" ".join(args)), self.heading_level)
        else:
            self.out.paragraph()
            self.pending = f"heading{self.heading_level}"
        self.heading_level = 1

    def _req_SS(self, rest: str, _nb: bool = False) -> None:
        self.heading_level = 2
        self._req_SH(rest)

    def _req_PP(self, rest: str, _nb: bool = False) -> None:
        self.pending = None
        self._gap()

    _req_LP = _req_PP
    _req_P = _req_PP
    _req_HP = _req_PP

    def _gap(self) -> None:
        if self.pd_zero:
            self.out.br()
        else:
            self.out.paragraph()

    def _req_PD(self, rest: str, _nb: bool) -> None:
        self.pd_zero = rest.strip() in ("0", "0v", "0u")

    def _req_TP(self, rest: str, _nb: bool) -> None:
        self._gap()
        self.pending = "tag"

    def _req_TQ(self, rest: str, _nb: bool) -> None:
        self.out.br()
        self.pending = "tag"

    def _req_IP(self, rest: str, _nb: bool) -> None:
        self._gap()
        self.pending = None
        args = _split_args(rest)
        tag = self._render(args[0][0]).strip() if args else ""
        if not tag:
            return
        self.out.add(tag)
        if len(tag) > 3:  # long tags stand on their own line; bullets and numbers lead the text
            self.out.br()

    def _req_RS(self, rest: str, _nb: bool) -> None:
        self.out.br()

    _req_RE = _req_RS

    def _font_macro(self, rest: str, joiner: str) -> None:
        args = [a for a, _ in _split_args(rest)]
        if args:
            self._emit(self._render(joiner.join(args)))

    def _req_B(self, rest: str, _nb: bool) -> None:
        self._font_macro(rest, " ")

    _req_I = _req_B
    _req_SM = _req_B
    _req_SB = _req_B

    def _req_BI(self, rest: str, _nb: bool) -> None:
        self._font_macro(rest, "")

    _req_IB = _req_BI
    _req_BR = _req_BI
    _req_RB = _req_BI
    _req_IR = _req_BI
    _req_RI = _req_BI

    def _req_EX(self, rest: str, nb: bool) -> None:
        self._req_nf(rest, nb)

    def _req_EE(self, rest: str, nb: bool) -> None:
        self._req_fi(rest, nb)

    def _req_UR(self, rest: str, _nb: bool) -> None:
        self.links.append((rest.strip(), self.out.emitted))

    _req_MT = _req_UR

    def _req_UE(self, rest: str, _nb: bool) -> None:
        if not self.links:
            return
        url, mark = self.links.pop()
        url = self._render(url)
        trail = self._render(" ".join(a for a, _ in _split_args(rest)))
        if self.out.emitted > mark:
            self.out.add(f"<{url}>{trail}")
        else:
            self.out.add(f"{url}{trail}")

    _req_ME = _req_UE

    def _leave_link(self) -> None:
        while self.links:
            self._req_UE("", False)

    def _req_SY(self, rest: str, _nb: bool) -> None:
        self.out.br()
        self._font_macro(rest, " ")

    def _req_YS(self, rest: str, _nb: bool) -> None:
        self.out.br()

    def _req_OP(self, rest: str, _nb: bool) -> None:
        args = [a for a, _ in _split_args(rest)]
        if args:
            self.out.add(self._render("[" + " ".join(args) + "]"))

    # tbl ------------------------------------------------------------------------------------

    def _table(self) -> None:
        raw: list[str] = []
        while self.stack:
            line = self.stack.pop()
            if re.match(r"^[.'][ \t]*TE\b", line):
                break
            raw.append(line)
        self.report.tables += 1
        tab = "\t"
        i = 0
        if raw and raw[0].rstrip().endswith(";"):
            m = re.search(r"tab\s*\((.)\)", raw[0])
            if m:
                tab = m.group(1)
            i = 1
        i = _skip_format(raw, i)
        rows: list[list[str]] = []
        while i < len(raw):
            line = raw[i]
            i += 1
            if re.match(r"^[.'][ \t]*T&", line):
                i = _skip_format(raw, i)
                continue
            if _is_control(line):
                continue  # requests between rows (.sp) only space the table
            if line.strip() in ("_", "=", ""):
                continue
            cells: list[str] = []
            remainder = line
            while True:
                parts = remainder.split(tab)
                done = True
                for k, part in enumerate(parts):
                    if part.strip() == "T{" and k == len(parts) - 1:
                        block, i = _text_block(raw, i)
                        cells.append(self._cell(block[0]))
                        remainder = block[1]
                        done = remainder is None
                        break
                    cells.append(self._cell([part]))
                if done:
                    break
                remainder = remainder.lstrip(tab) if remainder else ""
                if not remainder:
                    break
            if any(c for c in cells):
                rows.append(cells)
        self.out.paragraph()
        for row in rows:
            self.out.raw_line("\t".join(row).rstrip("\t"))
        self.report.table_rows += len(rows)
        self.out.paragraph()

    def _cell(self, lines: list[str]) -> str:
        """Render a table cell (it may hold requests) with this page's definitions."""
        saved = (self.out, self.stack, self.pending)
        self.out, self.stack, self.pending = _Writer(), [], None
        self._push(lines)
        self._loop()
        text = self.out.text()
        self.out, self.stack, self.pending = saved
        return _clean_line(text.replace("\n", " "))

    # mdoc -------------------------------------------------------------------------------------

    def _mdoc_line(self, name: str, args: list[tuple[str, bool]]) -> None:
        handler = getattr(self, f"_mdoc_{name}", None)
        if handler is not None:
            handler(args)
            return
        self._mdoc_inline([(name, False), *args])

    def _mdoc_inline(self, tokens: list[tuple[str, bool]]) -> None:
        """Render a line of callable macros and words as running text."""
        pieces = self._mdoc_parse(tokens)
        if not pieces:
            return
        if (pieces[0][1] or (not self.spacing and self.sm_started)) and self.out.current:
            self.out.join_next = True  # `.Ns` / closing punctuation / `.Sm off` glue lines
        if not self.spacing:
            self.sm_started = True
        text = _join_pieces(pieces, self.spacing)
        self._emit(text + (_JOIN if pieces[-1][2] else ""))
        if self.xo_open and any(t == "Xc" and not q for t, q in tokens):
            self.xo_open = False
            self.out.br()

    def _mdoc_parse(self, tokens: list[tuple[str, bool]]) -> list[tuple[str, bool, bool]]:
        """Pieces (text, glue_left, glue_right) for a token list."""
        pieces: list[tuple[str, bool, bool]] = []
        i = 0
        while i < len(tokens):
            tok, quoted = tokens[i]
            macro = tok if not quoted and tok in _MDOC_CALLABLE else None
            i += 1
            if macro is None:
                pieces.append(self._mdoc_word(tok, quoted))
                continue
            if macro in _MDOC_ENCLOSE:
                inner = tokens[i:]
                tail: list[tuple[str, bool]] = []
                while inner and not inner[-1][1] and inner[-1][0] in _CLOSE_DELIMS:
                    tail.insert(0, inner.pop())
                opening, closing = _MDOC_ENCLOSE[macro]
                pieces.append((opening, False, True))
                pieces.extend(self._mdoc_parse(inner))
                pieces.append((closing, True, False))
                pieces.extend(self._mdoc_word(t, q) for t, q in tail)
                return pieces
            if macro in _MDOC_OPEN:
                pieces.append((_MDOC_OPEN[macro], False, True))
                continue
            if macro in _MDOC_CLOSE:
                pieces.append((_MDOC_CLOSE[macro], True, False))
                continue
            if macro in ("Xo", "Xc", "Ec"):
                continue
            if macro == "Eo":
                if i < len(tokens):
                    pieces.append((self._render(tokens[i][0]), False, True))
                    i += 1
                continue
            if macro == "Ns":
                pieces.append(("", True, True))
                continue
            if macro == "Ap":
                pieces.append(("'", True, True))
                continue
            if macro == "Ta":
                pieces.append(("\t", True, True))
                continue
            if macro == "Pf":
                if i < len(tokens):
                    pieces.append((self._render(tokens[i][0]), False, True))
                    i += 1
                continue
            if macro == "Xr":
                words = []
                while i < len(tokens) and len(words) < 2 and not self._mdoc_stop(tokens[i]):
                    words.append(self._render(tokens[i][0]))
                    i += 1
                if words:
                    pieces.append((words[0] + (f"({words[1]})" if len(words) > 1 else ""), False, False))
                continue
            if macro in _MDOC_FIXED:
                words = []
                while i < len(tokens) and not self._mdoc_stop(tokens[i]):
                    words.append(self._render(tokens[i][0]))
                    i += 1
                text = _MDOC_FIXED[macro]
                if words:
                    text = (f"{text} {' '.join(words)}" if macro in ("At", "Ux") else
                            f"{text}{words[0]}" if macro == "Bx" else f"{text} {' '.join(words)}")
                pieces.append((text, False, False))
                continue
            if macro == "St":
                if i < len(tokens):
                    std = tokens[i][0]
                    pieces.append((_MDOC_STANDARDS.get(std, std.lstrip("-")), False, False))
                    i += 1
                continue
            if macro in ("Lk", "Mt"):
                words = []
                while i < len(tokens) and not self._mdoc_stop(tokens[i]):
                    words.append(self._render(tokens[i][0]))
                    i += 1
                if macro == "Lk" and len(words) > 1:
                    pieces.append((f"{' '.join(words[1:])}: {words[0]}", False, False))
                elif words:
                    pieces.append((words[0], False, False))
                continue
            if macro in ("Fn", "Fo"):
                words = []
                while i < len(tokens) and not self._mdoc_stop(tokens[i]):
                    words.append(self._render(tokens[i][0]))
                    i += 1
                if words:
                    text = f"{words[0]}(" + ", ".join(words[1:]) + (")" if macro == "Fn" else "")
                    pieces.append((text, False, macro == "Fo"))
                continue
            if macro == "Fc":
                pieces.append((")", True, False))
                continue
            if macro == "In":
                if i < len(tokens):
                    pieces.append((f"<{self._render(tokens[i][0])}>", False, False))
                    i += 1
                continue
            # word macros: the arguments up to the next callable macro
            has_word = False
            while i < len(tokens) and not (not tokens[i][1] and tokens[i][0] in _MDOC_CALLABLE):
                tok, quoted = tokens[i]
                i += 1
                if not quoted and (tok in _CLOSE_DELIMS or tok in _OPEN_DELIMS or tok == "|"):
                    if not has_word:
                        self._mdoc_default(macro, pieces)
                        has_word = True
                    pieces.append(self._mdoc_word(tok, quoted))
                    continue
                text = self._render(tok)
                if macro == "Fl":
                    text = "-" + text
                elif macro == "Nm" and not self.name:
                    self.name = text
                pieces.append((text, False, False))
                has_word = True
            if not has_word:
                self._mdoc_default(macro, pieces)
        return pieces

    def _mdoc_default(self, macro: str, pieces: list[tuple[str, bool, bool]]) -> None:
        """What a word macro prints without arguments."""
        default = {"Fl": "-", "Ar": "file ...", "Pa": "~", "Nm": self.name}.get(macro, "")
        if default:
            pieces.append((default, False, False))

    def _mdoc_stop(self, token: tuple[str, bool]) -> bool:
        tok, quoted = token
        return not quoted and (tok in _MDOC_CALLABLE or tok in _CLOSE_DELIMS or tok in _OPEN_DELIMS)

    def _mdoc_word(self, tok: str, quoted: bool) -> tuple[str, bool, bool]:
        text = self._render(tok)
        if not quoted and tok in _CLOSE_DELIMS:
            return text, True, False
        if not quoted and tok in _OPEN_DELIMS:
            return text, False, True
        return text, False, False

    # line-level mdoc macros
    def _mdoc_Sh(self, args: list[tuple[str, bool]], level: int = 1) -> None:
        self._mdoc_close_all()
        self.out.heading(_join_pieces(self._mdoc_parse(args), True), level)

    def _mdoc_Ss(self, args: list[tuple[str, bool]]) -> None:
        self._mdoc_Sh(args, level=2)

    def _mdoc_close_all(self) -> None:
        self.lists.clear()
        self.xo_open = False
        if not self.out.fill:
            self.out.br()
            self.out.fill = True

    def _mdoc_ignore(self, args: list[tuple[str, bool]]) -> None:
        """Page header (Dd, Dt, Os) and keep/font blocks print nothing themselves."""

    _mdoc_Dd = _mdoc_Dt = _mdoc_Os = _mdoc_Bk = _mdoc_Ek = _mdoc_Bf = _mdoc_Ef = _mdoc_ignore
    _mdoc_Lb = _mdoc_Db = _mdoc_ignore

    def _mdoc_Nd(self, args: list[tuple[str, bool]]) -> None:
        self._emit("— " + _join_pieces(self._mdoc_parse(args), True))

    def _mdoc_Pp(self, args: list[tuple[str, bool]]) -> None:
        self.out.paragraph()

    _mdoc_Lp = _mdoc_Pp

    def _mdoc_Sm(self, args: list[tuple[str, bool]]) -> None:
        mode = args[0][0] if args else ("on" if not self.spacing else "off")
        self.spacing = mode != "off"
        self.sm_started = False
        if len(args) > 1:
            self.out.join_next = True
            self._mdoc_inline(args[1:])

    def _mdoc_Bl(self, args: list[tuple[str, bool]]) -> None:
        flags = [a for a, _ in args]
        kind = next((f for f in flags if f in ("-tag", "-bullet", "-dash", "-hyphen", "-enum",
                                               "-item", "-ohang", "-hang", "-inset", "-diag",
                                               "-column")), "-item")
        self.lists.append({"kind": kind, "compact": "-compact" in flags, "n": 0})
        self.out.paragraph()

    def _mdoc_El(self, args: list[tuple[str, bool]]) -> None:
        if self.lists:
            self.lists.pop()
        self.xo_open = False
        self.out.paragraph()

    def _mdoc_It(self, args: list[tuple[str, bool]]) -> None:
        lst = self.lists[-1] if self.lists else {"kind": "-tag", "compact": False, "n": 0}
        lst["n"] += 1
        if lst["compact"] or lst["kind"] == "-column":
            self.out.br()
        else:
            self.out.paragraph()
        kind = lst["kind"]
        if kind in ("-bullet", "-dash", "-hyphen", "-enum"):
            mark = {"-bullet": "•", "-dash": "-", "-hyphen": "-"}.get(kind, f"{lst['n']}.")
            self.out.add(mark)
            if args:
                self._mdoc_inline(args)
            return
        if kind == "-item":
            if args:
                self._mdoc_inline(args)
            return
        if kind == "-column":
            row = _join_pieces(self._mdoc_parse(args), self.spacing)
            self.out.raw_line("\t".join(_clean_line(c) for c in row.split("\t")))
            return
        if not args:
            return
        has_xo = any(t == "Xo" and not q for t, q in args)
        has_xc = any(t == "Xc" and not q for t, q in args)
        self.out.add(_join_pieces(self._mdoc_parse(args), self.spacing))
        if has_xo and not has_xc:
            self.xo_open = True
            return
        if kind in ("-tag", "-hang", "-ohang"):
            self.out.br()

    def _mdoc_Bd(self, args: list[tuple[str, bool]]) -> None:
        flags = [a for a, _ in args]
        self.display_stack.append(self.out.fill)
        self.out.paragraph()
        if "-literal" in flags or "-unfilled" in flags:
            self.out.fill = False

    def _mdoc_Ed(self, args: list[tuple[str, bool]]) -> None:
        self.out.br()
        self.out.fill = self.display_stack.pop() if self.display_stack else True
        self.out.paragraph()

    def _mdoc_D1(self, args: list[tuple[str, bool]]) -> None:
        self.out.br()
        self._mdoc_inline(args)
        self.out.br()

    _mdoc_Dl = _mdoc_D1

    def _mdoc_Rs(self, args: list[tuple[str, bool]]) -> None:
        self.reference = []

    def _mdoc_Re(self, args: list[tuple[str, bool]]) -> None:
        if self.reference:
            order = {f: k for k, f in enumerate(_REFERENCE_FIELDS)}
            fields = sorted(self.reference, key=lambda kv: order.get(kv[0], 99))
            authors = [v for k, v in fields if k == "%A"]
            rest = [v for k, v in fields if k != "%A"]
            parts = ([" and ".join(authors)] if authors else []) + rest
            self.out.br()
            self._emit(", ".join(parts) + ".")
            self.out.br()
        self.reference = None

    def _mdoc_reference_field(self, name: str, rest: str) -> None:
        text = _join_pieces(self._mdoc_parse(_split_args(rest)), True)
        if self.reference is not None:
            self.reference.append((name, text))
        else:
            self._emit(text)

    def _mdoc_An(self, args: list[tuple[str, bool]]) -> None:
        args = [a for a in args if a[0] not in ("-split", "-nosplit")]
        if args:
            self._mdoc_inline(args)

    def _mdoc_Ex(self, args: list[tuple[str, bool]]) -> None:
        names = [self._render(a) for a, _ in args if a != "-std"] or [self.name]
        self._emit(f"The {' '.join(names)} utility exits 0 on success, and >0 if an error occurs.")

    def _mdoc_Rv(self, args: list[tuple[str, bool]]) -> None:
        names = [self._render(a) for a, _ in args if a != "-std"] or [self.name]
        self._emit(f"The {' '.join(n + '()' for n in names)} function returns the value 0 if "
                   "successful; otherwise the value -1 is returned and the global variable errno "
                   "is set to indicate the error.")

    def _mdoc_Nm(self, args: list[tuple[str, bool]]) -> None:
        if args and not self.name:
            self.name = self._render(args[0][0])
        self._mdoc_inline([("Nm", False), *args])


_PREDEFINED_STRINGS = {
    # man (an.tmac) and mdoc (doc.tmac) strings that pages use without defining them
    "R": "®", "S": "", "Tm": "™", "lq": "“", "rq": "”", "Lq": "“", "Rq": "”", "Lt": "<",
    "Gt": ">", "Le": "≤", "Ge": "≥", "Pi": "π", "Ne": "≠", "If": "∞", "Am": "&", "Ba": "|",
    "Na": "NaN", "Px": "POSIX", "Ai": "ANSI", "q": '"', "Aq": "'", "HF": "", "Ua": "↑",
    "Da": "↓", "Ra": "→", "La": "←", "la": "<", "ra": ">", ".T": "utf8",
}

_MDOC_LINE_MACROS = {"Sh", "Ss", "Nd", "Pp", "Lp", "Sm", "Bl", "El", "It", "Bd", "Ed", "D1",
                     "Dl", "Rs", "Re", "An", "Ex", "Rv", "Nm", "Dd", "Dt", "Os", "Bk", "Ek",
                     "Bf", "Ef", "Lb", "Db"}


def _join_pieces(pieces: list[tuple[str, bool, bool]], spacing: bool) -> str:
    out = ""
    glue = True
    for text, glue_left, glue_right in pieces:
        if out and spacing and not glue and not glue_left:
            out += " "
        out += text
        glue = glue_right
    return out


def _copy_mode(line: str) -> str:
    """A line as troff stores it in a macro or string body: `\\\\` becomes `\\`."""
    if "\\\\" not in line:
        return line
    out = []
    i = 0
    while i < len(line):
        if line[i] == "\\" and i + 1 < len(line):
            out.append("\\" if line[i + 1] == "\\" else line[i:i + 2])
            i += 2
        else:
            out.append(line[i])
            i += 1
    return "".join(out)


def _skip_size(s: str, i: int) -> int:
    """Past the argument of `\\s`: `\\s0`, `\\s+1`, `\\s(12`, `\\s[10]`, `\\s'12'`."""
    if i < len(s) and s[i] in "+-":
        i += 1
    if i >= len(s):
        return i
    if s[i] == "(":
        return i + 3
    if s[i] in "['":
        _, j = _read_delimited(s, i)
        return j
    if s[i].isdigit():
        if s[i] in "123" and i + 1 < len(s) and s[i + 1].isdigit():
            return i + 2
        return i + 1
    return i


def _skip_format(raw: list[str], i: int) -> int:
    """Past the tbl format lines (the last one ends with a period)."""
    while i < len(raw):
        line = raw[i].rstrip()
        i += 1
        if line.endswith("."):
            break
    return i


def _text_block(raw: list[str], i: int) -> tuple[tuple[list[str], str | None], int]:
    """A tbl `T{ ... T}` cell: its lines, and what follows `T}` on its closing line."""
    lines: list[str] = []
    while i < len(raw):
        line = raw[i]
        i += 1
        if line.startswith("T}"):
            rest = line[2:]
            return (lines, rest if rest else None), i
        lines.append(line)
    return (lines, None), i
