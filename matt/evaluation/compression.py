"""How much text one token carries: the efficiency side of a tokenizer transfer.

A tokenizer made for the target language packs more bytes into each token, which is where the
inference speed-up of a transfer comes from. Ratios are corpus-level (total / total), so long
documents weigh in proportion to their length, and tokens are counted without special tokens.
"""

from __future__ import annotations

from collections.abc import Iterable

from matt.evaluation.bpb import nonempty_texts


def compression(tokenizer, texts: Iterable[str]) -> dict[str, float]:
    """`bytes_per_token` (UTF-8), `tokens_per_word` (whitespace-split words), `chars_per_token`."""
    texts = nonempty_texts(texts)
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    tokens = sum(len(ids) for ids in encoded)
    if tokens == 0:
        raise ValueError("The tokenizer produced no tokens for the given texts")
    words = sum(len(text.split()) for text in texts)
    return {
        "bytes_per_token": sum(len(text.encode("utf-8")) for text in texts) / tokens,
        "tokens_per_word": tokens / words if words else float("nan"),
        "chars_per_token": sum(len(text) for text in texts) / tokens,
    }
