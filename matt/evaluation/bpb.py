"""Bits per byte: next-token loss normalised by UTF-8 bytes, comparable across tokenizers.

Per-token perplexity rewards a tokenizer for cutting text into many easy pieces; dividing the
total information (bits) by the bytes of the text removes that: two models that assign the same
probability to a document get the same BPB whatever their tokenizers are.

Definition used here, per document: tokenize without special tokens, condition the first token on
one prefix token (BOS, else EOS), and sum -ln p over *every* text token. Documents longer than
`max_length` are cut into consecutive windows of tokens; each window starts again from the prefix
token, and every window after the first carries `overlap` already-scored tokens of the document as
extra, unscored context. With the default `overlap=0` windows are disjoint (cheap, and the same rule for
every model; the tokens just after a window boundary see less context, which slightly inflates
BPB for documents longer than the window). BPB = Σ nll / ln 2 / Σ UTF-8 bytes of the texts.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from matt.evaluation.scoring import check_max_length, prefix_token_id, score_sequences

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BPBResult:
    """Totals behind a bits-per-byte number (kept so results can be pooled or re-normalised)."""

    bpb: float
    nll_nats: float
    bytes: int
    tokens: int
    documents: int

    @classmethod
    def from_totals(cls, nll_nats: float, num_bytes: int, tokens: int, documents: int) -> BPBResult:
        if num_bytes <= 0:
            raise ValueError("Cannot compute bits per byte of zero bytes of text")
        return cls(nll_nats / math.log(2) / num_bytes, nll_nats, num_bytes, tokens, documents)


def as_text_list(texts: Iterable[str], what: str = "texts") -> list[str]:
    """Materialise `texts`, rejecting a bare string (a common slip: it would iterate characters)."""
    if isinstance(texts, str):
        raise TypeError(f"{what} must be a list of documents, not a single string")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{what}[{i}] is {type(text).__name__}, expected str")
    return texts


def nonempty_texts(texts: Iterable[str], what: str = "texts") -> list[str]:
    """Drop empty documents (they have no bytes to score), logging how many were dropped."""
    texts = as_text_list(texts, what)
    kept = [text for text in texts if text]
    if len(kept) < len(texts):
        logger.warning("Skipping %d empty document(s) of %d in %s", len(texts) - len(kept), len(texts), what)
    if not kept:
        raise ValueError(f"No non-empty documents in {what}")
    return kept


def windows(
    token_ids: list[int], prefix_id: int, max_length: int, overlap: int = 0
) -> list[tuple[list[int], int]]:
    """Cut one document's tokens into model inputs `(ids, num_context)` that score each token once.

    The first window is `[prefix] + the first max_length - 1 tokens`; every later one is
    `[prefix] + overlap already-scored tokens + up to max_length - 1 - overlap new tokens`, so no
    window is longer than `max_length`. The first `num_context` ids of a window are context only.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (prefix token + one scored token), got {max_length}")
    if not 0 <= overlap < max_length - 1:
        raise ValueError(f"overlap must be in [0, max_length - 1), got {overlap} with max_length={max_length}")
    if not token_ids:
        raise ValueError("Cannot cut an empty token list into scoring windows")
    result = [([prefix_id, *token_ids[: max_length - 1]], 1)]
    step = max_length - 1 - overlap
    for start in range(max_length - 1, len(token_ids), step):
        context = token_ids[start - overlap : start]
        result.append(([prefix_id, *context, *token_ids[start : start + step]], 1 + len(context)))
    return result


def bits_per_byte(
    model: torch.nn.Module,
    tokenizer,
    texts: Iterable[str],
    *,
    max_length: int = 1024,
    batch_size: int = 4,
    device: torch.device | str | None = None,
    overlap: int = 0,
    progress: bool = True,
) -> BPBResult:
    """Bits per UTF-8 byte of `texts` under `model` with `tokenizer` (see the module docstring).

    `device`: where inputs go; defaults to the model's device (the model is not moved).
    """
    texts = nonempty_texts(texts)
    check_max_length(model, max_length)
    prefix_id = prefix_token_id(tokenizer)
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    sequences: list[list[int]] = []
    num_context: list[int] = []
    num_bytes = num_tokens = 0
    for text, ids in zip(texts, encoded):
        if not ids:
            raise ValueError(f"The tokenizer produced no tokens for a non-empty text: {text[:60]!r}")
        num_bytes += len(text.encode("utf-8"))
        num_tokens += len(ids)
        for window_ids, n_ctx in windows(ids, prefix_id, max_length, overlap):
            sequences.append(window_ids)
            num_context.append(n_ctx)
    nll = score_sequences(
        model, sequences, num_context, batch_size=batch_size, device=device, progress=progress, desc="bpb"
    )
    return BPBResult.from_totals(math.fsum(nll), num_bytes, num_tokens, len(texts))
