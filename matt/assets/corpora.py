"""Text corpora from Debian documentation packages, as train / validation / test jsonl files.

Each corpus directory holds `train.jsonl`, `validation.jsonl` and `test.jsonl` (one
`{"text": ..., "id": ...}` document per line, sorted by id) and `stats.json` (documents,
characters and UTF-8 bytes per split, plus everything dropped and why). Splits are made of
whole documents chosen in the order of a hash of their ids (see `assign_splits`).
"""

from __future__ import annotations

import gzip
import json
import logging
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from tqdm.auto import tqdm

from matt.assets.html_text import html_to_text
from matt.assets.man_text import MANDOC_ARGS, clean_mandoc_output, fetch_mandoc, run_mandoc
from matt.assets.sources import AssetError, apt_download, deb_extract
from matt.digests import text_digest

logger = logging.getLogger(__name__)

__all__ = ["SPLITS", "assign_splits", "prepare_manpages_uk", "prepare_python_doc_en", "write_corpus"]

SPLITS = ("train", "validation", "test")
HELD_OUT_FRACTIONS = {"test": 0.05, "validation": 0.05}
SPLIT_RULE = ("documents in sha256(id) order; each goes to test, else validation, if it still "
              "fits that split's budget of 5% of all characters, else to train")


def assign_splits(sizes: dict[str, int]) -> dict[str, str]:
    """Split of each document id, given its size in characters.

    Whole documents only (no page is shared between splits). Documents are visited in the
    order of a hash of their id — a fixed, content-independent shuffle — and the held-out
    splits take every document that still fits their character budget. Why budgets and not
    `hash % 100`: a manual has a few huge pages (bash) among many small ones, and a pure
    per-document draw left the Ukrainian test split with two pages and 800 characters.
    """
    total = sum(sizes.values())
    budget = {split: fraction * total for split, fraction in HELD_OUT_FRACTIONS.items()}
    used = {split: 0 for split in HELD_OUT_FRACTIONS}
    result = {}
    for doc_id in sorted(sizes, key=text_digest):
        n = sizes[doc_id]
        result[doc_id] = next((s for s in HELD_OUT_FRACTIONS if used[s] + n <= budget[s]), "train")
        if result[doc_id] != "train":
            used[result[doc_id]] += n
    return result


def write_corpus(documents: Iterable[tuple[str, str]], out_dir: Path) -> dict:
    """Write `(id, text)` documents as split jsonl files; returns the per-split stats."""
    out_dir.mkdir(parents=True, exist_ok=True)
    docs: dict[str, str] = {}
    for doc_id, text in documents:
        if doc_id in docs:
            raise AssetError(f"duplicate document id {doc_id!r}")
        docs[doc_id] = text
    if not docs:
        raise AssetError(f"no documents to write to {out_dir}")
    splits = assign_splits({doc_id: len(text) for doc_id, text in docs.items()})
    stats = {}
    for split in SPLITS:
        ids = sorted(d for d in docs if splits[d] == split)
        with open(out_dir / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for doc_id in ids:
                f.write(json.dumps({"text": docs[doc_id], "id": doc_id}, ensure_ascii=False) + "\n")
        stats[split] = {"documents": len(ids), "characters": sum(len(docs[d]) for d in ids),
                        "bytes": sum(len(docs[d].encode("utf-8")) for d in ids)}
    stats["total"] = {k: sum(stats[s][k] for s in SPLITS) for k in ("documents", "characters", "bytes")}
    return stats


def _unpack(package: str, folder: str, downloads: Path, work: Path) -> tuple[Path, dict]:
    """`folder` of the Debian `package` unpacked under `work`, and the package facts."""
    deb = apt_download(package, downloads)
    unpacked, version = deb_extract(deb, work / "deb")
    root = unpacked / folder
    if not root.is_dir():
        raise AssetError(f"{deb.name} has no {folder}/ folder")
    return root, {"package": package, "version": version, "deb": deb.name,
                  "source": f"Debian apt (`apt-get download {package}`)"}


# --------------------------------------------------------------------------------------------
# manpages-uk
# --------------------------------------------------------------------------------------------

_SO_ONLY = re.compile(r"^(?:[.']\s*\\\".*\n|\s*\n)*[.']so\s+\S+\s*(?:\n\s*)*$")


def _man_documents(man_root: Path, mandoc: Path, *, min_chars: int, drop_sections: tuple[str, ...],
                   counts: Counter, messages: Counter) -> Iterable[tuple[str, str]]:
    pages = sorted(p for p in man_root.rglob("*") if p.is_file() or p.is_symlink())
    for path in tqdm(pages, desc="man pages → text", unit="page"):
        rel = path.relative_to(man_root).as_posix()
        doc_id = re.sub(r"\.gz$", "", rel)
        if path.is_symlink():
            counts["symlinked_aliases_skipped"] += 1
            continue
        if not re.match(r"man[0-9a-z]+/", rel):
            counts["non_page_files_skipped"] += 1
            continue
        try:
            data = path.read_bytes()
            source = (gzip.decompress(data) if path.suffix == ".gz" else data).decode("utf-8")
        except (UnicodeDecodeError, OSError, EOFError) as error:
            counts["unreadable_pages_skipped"] += 1
            logger.warning("skipping %s: %s", rel, error)
            continue
        if _SO_ONLY.match(source):
            counts["so_alias_pages_skipped"] += 1  # the page it points to is a document itself
            continue
        output, levels = run_mandoc(mandoc, source, page=rel, cwd=man_root)
        messages.update(levels)
        text = clean_mandoc_output(output, drop_sections=drop_sections)
        if len(text) < min_chars:
            counts[f"shorter_than_{min_chars}_chars_skipped"] += 1
            logger.info("skipping %s: only %d characters", rel, len(text))
            continue
        yield doc_id, text


def prepare_manpages_uk(out_dir: Path, downloads: Path, work: Path, *, min_chars: int = 200) -> dict:
    man_root, source = _unpack("manpages-uk", "usr/share/man/uk", downloads, work)
    mandoc, mandoc_version = fetch_mandoc(downloads, work)
    counts: Counter = Counter()
    messages: Counter = Counter()
    # the translators' credits (ПЕРЕКЛАД) are the same boilerplate on every page
    stats = write_corpus(_man_documents(man_root, mandoc, min_chars=min_chars,
                                        drop_sections=("ПЕРЕКЛАД",), counts=counts,
                                        messages=messages), out_dir)
    return {"source": source, "stats": stats, "dropped": dict(sorted(counts.items())),
            "converter": {"name": f"mandoc {' '.join(MANDOC_ARGS)} (Debian mandoc "
                                  f"{mandoc_version}) + matt.assets.man_text clean-up",
                          "mandoc_messages": dict(sorted(messages.items()))},
            "min_chars": min_chars, "removed_sections": ["ПЕРЕКЛАД (translation credits)"],
            "split": SPLIT_RULE}


# --------------------------------------------------------------------------------------------
# python3.11-doc
# --------------------------------------------------------------------------------------------

# Generated index and navigation pages are link lists, not prose.
_PYDOC_EXCLUDE = re.compile(r"^(genindex.*|py-modindex|search|contents)\.html$")


def _html_documents(html_root: Path, *, min_chars: int, counts: Counter) -> Iterable[tuple[str, str]]:
    pages = sorted(html_root.rglob("*.html"))
    for path in tqdm(pages, desc="HTML pages → text", unit="page"):
        rel = path.relative_to(html_root).as_posix()
        if path.is_symlink():
            counts["symlinks_skipped"] += 1
            continue
        if rel.startswith("_") or _PYDOC_EXCLUDE.match(rel):
            counts["index_pages_skipped"] += 1
            continue
        text = html_to_text(path.read_text(encoding="utf-8"))
        if len(text) < min_chars:
            counts[f"shorter_than_{min_chars}_chars_skipped"] += 1
            continue
        yield rel.removesuffix(".html"), text


def prepare_python_doc_en(out_dir: Path, downloads: Path, work: Path, *, min_chars: int = 200) -> dict:
    html_root, source = _unpack("python3.11-doc", "usr/share/doc/python3.11/html", downloads, work)
    counts: Counter = Counter()
    stats = write_corpus(_html_documents(html_root, min_chars=min_chars, counts=counts), out_dir)
    return {"source": source, "stats": stats, "dropped": dict(sorted(counts.items())),
            "converter": {"name": "matt.assets.html_text (stdlib html.parser)"},
            "min_chars": min_chars, "excluded_pages": _PYDOC_EXCLUDE.pattern,
            "split": SPLIT_RULE}

