"""Cache keys are named by `matt.digests`: the values of fixed inputs are pinned (computed before the
digest helpers were gathered in one module), so existing caches stay valid and a change is noticed."""

from __future__ import annotations

import types
from pathlib import Path

import pytest

from matt import digests


class FakeTokenizer:
    """Just what `tokenizer_fingerprint` reads, fixed (a real tokenizer's JSON changes with `tokenizers`)."""

    is_fast = True
    backend_tokenizer = types.SimpleNamespace(to_str=lambda: '{"model": "fixed"}')
    special_tokens_map = {"eos_token": "</s>", "bos_token": "<s>"}
    added_tokens_decoder = {1: "<s>", 2: "</s>"}


def test_known_digests_are_unchanged(tmp_path):
    assert digests.tokenizer_fingerprint(FakeTokenizer()) == (
        "d7e502db9808a020e1534088a27b5a5cd9027b7e4d335e51b881f52beb98208c")
    assert digests.texts_digest(["Привіт, світ", "b", ""]) == (
        "f58a88bed5e5268b115290cdb4a487040f3365bbf55fd8318bc1a0d0825b4a7a")
    assert digests.cache_key({"b": [1, 2], "a": "x", "p": Path("/tmp/x")}) == "d4a0b72f810cf41e5ac5"
    assert digests.text_digest("man/uk/ls.1") == "10f6355cb233172463560c8bd473d371fdaeb1d4021f2885695cebb8ba11a7b3"
    path = tmp_path / "f.bin"
    path.write_bytes(bytes(range(256)) * 5000)  # > 1 MiB: more than one block
    assert digests.file_digest(path) == "7d471e4af16db5a30ce10aebbc29f5178b2edbad6c7dc2e8ff8ee6e4848a726f"


def test_cache_keys_built_on_the_digests_are_unchanged():
    from matt.batches import _data_fingerprint

    assert _data_fingerprint({"text": ["a", None, "ü"]}, "text") == (
        "rows:2e3e61b6fb7b9c3c4fc7267d13acad3103fe545c38fe4b09a9f40d9ed4d00bbe")


def test_texts_digest_separates_documents_and_rejects_non_text():
    assert digests.texts_digest(["a", "b"]) != digests.texts_digest(["ab"])
    with pytest.raises(ValueError, match="Training document 1 is int"):
        digests.texts_digest(["a", 1])


def test_tokenizer_fingerprint_needs_a_fast_tokenizer():
    slow = FakeTokenizer()
    slow.is_fast = False
    with pytest.raises(ValueError, match="not a fast tokenizer"):
        digests.tokenizer_fingerprint(slow)
