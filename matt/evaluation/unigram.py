"""Context-free unigram baseline: what a tokenizer alone achieves, in bits per byte.

A model that ignores context entirely and predicts each token with its training frequency sets a
floor every real language model must beat. Reporting it next to the model's BPB separates "the new
tokenizer is simply coarser" from "the model learned to use the new tokens in context": an adapted
model whose BPB is near its tokenizer's unigram floor has lost its contextual knowledge.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from matt.evaluation.bpb import BPBResult, nonempty_texts


class UnigramModel:
    """Add-k smoothed token frequencies over the whole tokenizer vocabulary (`len(tokenizer)`)."""

    def __init__(self, tokenizer, counts: np.ndarray, smoothing: float) -> None:
        if smoothing <= 0:
            raise ValueError(f"smoothing must be > 0 (otherwise unseen tokens get probability 0), got {smoothing}")
        if counts.ndim != 1 or len(counts) != len(tokenizer):
            raise ValueError(f"counts must be a vector of len(tokenizer)={len(tokenizer)} entries, got {counts.shape}")
        self.tokenizer = tokenizer
        self.counts = counts.astype(np.int64)
        self.smoothing = float(smoothing)
        total = float(self.counts.sum()) + self.smoothing * len(self.counts)
        self.log_probs = np.log((self.counts + self.smoothing) / total)

    @classmethod
    def fit(cls, tokenizer, train_texts: Iterable[str], smoothing: float = 1.0) -> UnigramModel:
        """Count tokens (no special tokens) of the training split."""
        texts = nonempty_texts(train_texts, "train_texts")
        counts = np.bincount(_token_ids(tokenizer, texts), minlength=len(tokenizer))
        if len(counts) > len(tokenizer):
            raise ValueError(f"The tokenizer produced id {len(counts) - 1} >= len(tokenizer)={len(tokenizer)}")
        return cls(tokenizer, counts, smoothing)

    def bits_per_byte(self, texts: Iterable[str]) -> BPBResult:
        """-Σ log p(token) / ln 2 / UTF-8 bytes over held-out `texts` (same token set as model BPB)."""
        texts = nonempty_texts(texts)
        ids = _token_ids(self.tokenizer, texts)
        num_bytes = sum(len(text.encode("utf-8")) for text in texts)
        return BPBResult.from_totals(-float(self.log_probs[ids].sum()), num_bytes, len(ids), len(texts))

    def entropy_bits(self) -> float:
        """Entropy of the fitted distribution in bits per token (a quick sanity number)."""
        probs = np.exp(self.log_probs)
        return float(-(probs * self.log_probs).sum() / math.log(2))


def _token_ids(tokenizer, texts: list[str]) -> np.ndarray:
    """All token ids of `texts` (no special tokens), concatenated."""
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return np.concatenate([np.asarray(ids, dtype=np.int64) for ids in encoded])
