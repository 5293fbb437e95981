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

Where the loss sits (`NewByteMasks`, `bits_per_byte(..., new_bytes=...)`): a tokenizer transfer
keeps the tokens the student shares with the teacher and learns the new ones, so its loss sits in
the text the new tokens cover. Each byte of the evaluated text is classed once, by the *student*
tokenization: "new" if the student token covering it is not in the teacher vocabulary
(`matt.overlap.token_overlap`), else "shared". Any model's per-token NLL is spread evenly over the
bytes of its token, and `bpb_new` / `bpb_shared` are the bits of the new / shared bytes divided by
their number, so the original model (teacher tokens, which may straddle a class boundary) and the
student are compared on exactly the same bytes; for the student itself the split is exact.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from matt.evaluation.scoring import check_max_length, prefix_token_id, token_nll
from matt.overlap import TokenOverlap, token_bytes, token_overlap

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BPBResult:
    """Totals behind a bits-per-byte number (kept so results can be pooled or re-normalised)."""

    bpb: float
    nll_nats: float
    bytes: int
    tokens: int
    documents: int
    bpb_new: float | None = None
    """Bits per byte on the bytes covered by new student tokens (with `new_bytes`; NaN if none)."""
    bpb_shared: float | None = None
    """Bits per byte on the bytes covered by student tokens shared with the teacher."""
    new_byte_fraction: float | None = None
    """Share of the bytes covered by new student tokens."""
    document_bits: tuple[float, ...] = ()
    """Bits of each document, in order (they sum to `nll_nats` / ln 2)."""
    document_bytes: tuple[int, ...] = ()
    """UTF-8 bytes of each document: with `document_bits` the units of a bootstrap interval
    (`matt.evaluation.intervals.ratio_bootstrap`)."""

    @classmethod
    def from_totals(cls, nll_nats: float, num_bytes: int, tokens: int, documents: int) -> BPBResult:
        if num_bytes <= 0:
            raise ValueError("Cannot compute bits per byte of zero bytes of text")
        return cls(nll_nats / math.log(2) / num_bytes, nll_nats, num_bytes, tokens, documents)


def token_byte_lengths(tokenizer, texts: list[str], encoded: list[list[int]]) -> list[np.ndarray]:
    """UTF-8 length of each token of each encoded text, read from the vocabulary (`token_bytes`);
    fails unless a text's token bytes add up to the text (then bytes cannot be attributed)."""
    table = token_bytes(tokenizer)
    lengths = np.array([0 if b is None else len(b) for b in table], dtype=np.int64)
    result = []
    for text, ids in zip(texts, encoded):
        sizes = lengths[np.asarray(ids, dtype=np.int64)]
        if int(sizes.sum()) != len(text.encode("utf-8")) or (sizes == 0).any():
            raise ValueError(
                f"The tokens of {text[:40]!r}... do not add up to its {len(text.encode('utf-8'))} UTF-8 bytes "
                f"({int(sizes.sum())}; a normalising tokenizer or a special token in the text): bytes cannot "
                "be attributed to tokens for bpb_new / bpb_shared.")
        result.append(sizes)
    return result


@dataclass(frozen=True)
class NewByteMasks:
    """Per evaluated document, a boolean per UTF-8 byte: covered by a new student token (True) or a
    shared one (False). Built once per evaluation suite and used for every model."""

    masks: list[np.ndarray]

    @classmethod
    def from_tokenizers(cls, teacher_tokenizer, student_tokenizer, texts: Iterable[str], *,
                        overlap: TokenOverlap | None = None) -> NewByteMasks:
        """`overlap`: the tokenizers' `TokenOverlap` when the caller has it (else computed here)."""
        texts = nonempty_texts(texts)
        overlap = overlap if overlap is not None else token_overlap(teacher_tokenizer, student_tokenizer)
        shared = set(overlap.student_to_teacher)
        encoded = student_tokenizer(texts, add_special_tokens=False)["input_ids"]
        masks = []
        for ids, sizes in zip(encoded, token_byte_lengths(student_tokenizer, texts, encoded)):
            is_new = np.array([token not in shared for token in ids], dtype=bool)
            masks.append(np.repeat(is_new, sizes))
        return cls(masks)

    @property
    def new_byte_fraction(self) -> float:
        return float(np.concatenate(self.masks).mean())


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


def windows(token_ids: list[int], prefix_id: int, max_length: int, overlap: int = 0) -> list[tuple[list[int], int]]:
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


def bits_per_byte(model: torch.nn.Module, tokenizer, texts: Iterable[str], *, max_length: int = 1024,
                  batch_size: int = 4, device: torch.device | str | None = None, overlap: int = 0,
                  progress: bool = True, new_bytes: NewByteMasks | None = None) -> BPBResult:
    """Bits per UTF-8 byte of `texts` under `model` with `tokenizer` (see the module docstring).

    `device`: where inputs go; defaults to the model's device (the model is not moved).
    `new_bytes`: masks of the same (non-empty) texts; adds `bpb_new`, `bpb_shared` and
    `new_byte_fraction` to the result.
    """
    texts = nonempty_texts(texts)
    check_max_length(model, max_length)
    document_bytes = [len(text.encode("utf-8")) for text in texts]
    if new_bytes is not None and [m.size for m in new_bytes.masks] != document_bytes:
        raise ValueError("new_bytes masks do not match the evaluated texts (built from other documents?)")
    prefix_id = prefix_token_id(tokenizer)
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    sequences: list[list[int]] = []
    num_context: list[int] = []
    for text, ids in zip(texts, encoded):
        if not ids:
            raise ValueError(f"The tokenizer produced no tokens for a non-empty text: {text[:60]!r}")
        for window_ids, n_ctx in windows(ids, prefix_id, max_length, overlap):
            sequences.append(window_ids)
            num_context.append(n_ctx)
    parts = token_nll(model, sequences, num_context, batch_size=batch_size, device=device, progress=progress,
                      desc="bpb")
    # Windows come in document order and score each token once: concatenated, they are the documents' tokens.
    nll = np.concatenate([part.double().numpy() for part in parts])
    per_document = np.split(nll, np.cumsum([len(ids) for ids in encoded])[:-1])
    result = dataclasses.replace(
        BPBResult.from_totals(math.fsum(nll), sum(document_bytes), len(nll), len(texts)),
        document_bits=tuple(float(bits.sum()) / math.log(2) for bits in per_document),
        document_bytes=tuple(document_bytes))
    if new_bytes is None:
        return result
    # Each token's NLL spread evenly over its bytes, in bits.
    per_byte = np.concatenate([np.repeat(doc_nll / sizes, sizes) for doc_nll, sizes
                               in zip(per_document, token_byte_lengths(tokenizer, texts, encoded))]) / math.log(2)
    is_new = np.concatenate(new_bytes.masks)
    bpb_new, bpb_shared = (float(per_byte[m].mean()) if m.any() else float("nan") for m in (is_new, ~is_new))
    return dataclasses.replace(result, bpb_new=bpb_new, bpb_shared=bpb_shared,
                               new_byte_fraction=float(is_new.mean()))
