"""Content digests (SHA-256, hex) for cache keys, fingerprints and file checks: one definition each.

Every cache directory and key in MATT is named by one of these, so changing how one is computed
invalidates caches (tests pin known values)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from matt.segmentation import check_offsets_support

CACHE_KEY_CHARS = 20
"""Hex digits of a `cache_key` (80 bits: plenty for names of cache entries)."""


def text_digest(text: str) -> str:
    """SHA-256 of a string's UTF-8 bytes."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def texts_digest(texts: Iterable[str]) -> str:
    """SHA-256 of a sequence of strings (each followed by a NUL byte, so `["ab"]` != `["a", "b"]`).

    Raises `ValueError` for an entry that is not a string (naming its index)."""
    digest = hashlib.sha256()
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"Training document {i} is {type(text).__name__} ({text!r:.40}), not text: point "
                             "data.text_column at a column of strings")
        digest.update(text.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def json_digest(value: Any) -> str:
    """SHA-256 of a JSON-serialisable value (keys sorted; other objects by `str`)."""
    return text_digest(json.dumps(value, sort_keys=True, default=str))


def cache_key(value: Any) -> str:
    """A short stable name for a JSON-serialisable value: the first `CACHE_KEY_CHARS` hex of `json_digest`."""
    return json_digest(value)[:CACHE_KEY_CHARS]


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of what decides `tokenizer(text)`: the serialized Rust pipeline and the special tokens."""
    check_offsets_support(tokenizer)
    return json_digest({
        "backend": tokenizer.backend_tokenizer.to_str(),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "class": type(tokenizer).__name__,
        "added": sorted((i, str(t)) for i, t in tokenizer.added_tokens_decoder.items()),
    })
