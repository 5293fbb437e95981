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
        counts = np.zeros(len(tokenizer), dtype=np.int64)
        for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            ids = np.asarray(ids, dtype=np.int64)
            if ids.size and ids.max() >= len(counts):
                raise ValueError(f"The tokenizer produced id {int(ids.max())} >= len(tokenizer)={len(counts)}")
            np.add.at(counts, ids, 1)
        return cls(tokenizer, counts, smoothing)

    def bits_per_byte(self, texts: Iterable[str]) -> BPBResult:
        """-Σ log p(token) / ln 2 / UTF-8 bytes over held-out `texts` (same token set as model BPB)."""
        texts = nonempty_texts(texts)
        nll = 0.0
        tokens = 0
        for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]:
            nll -= float(self.log_probs[np.asarray(ids, dtype=np.int64)].sum())
            tokens += len(ids)
        num_bytes = sum(len(text.encode("utf-8")) for text in texts)
        return BPBResult.from_totals(nll, num_bytes, tokens, len(texts))

    def entropy_bits(self) -> float:
        """Entropy of the fitted distribution in bits per token (a quick sanity number)."""
        probs = np.exp(self.log_probs)
        return float(-(probs * self.log_probs).sum() / math.log(2))
