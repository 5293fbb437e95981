"""Which student tokens already exist in the teacher's vocabulary — compared by the BYTES they stand for.

Why bytes: two tokenizers spell the same piece of text differently. A byte-level BPE (GPT-2, Llama 3,
Qwen) stores " світ" as "ĠÑģÐ²ÑĸÑĤ" (every byte mapped to a printable character), a SentencePiece-style
one (Llama 2, Mistral, Gemma) as "▁світ", and its byte-fallback tokens as "<0xD1>". Decoding single
ids to text (what deepfocus does) is lossy: every byte-level token holding part of a multi-byte UTF-8
character decodes to the same "�", so such tokens collide and shared tokens receive the wrong
teacher row. Mapping every token to its exact byte string makes the comparison lossless and also
comparable across the two styles.

Special tokens have no bytes (they are never produced from text). They are matched by role
(bos/eos/unk/pad) when both tokenizers have that role, then by identical content (e.g. chat markers
kept by an extended tokenizer); the rest are new tokens.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch

from matt.segmentation import backend_state, special_token_ids

logger = logging.getLogger(__name__)

SPECIAL_ROLES = ("bos", "eos", "unk", "pad")
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@lru_cache(maxsize=1)
def byte_level_decoder() -> dict[str, int]:
    """Inverse of the GPT-2 byte-to-character table of byte-level BPE (a leading space is "Ġ")."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {char: byte for byte, char in bytes_to_unicode().items()}


# --------------------------------------------------------------------------------------------------
# Tokenizer style detection
# --------------------------------------------------------------------------------------------------
def _components(node: Any) -> list[dict]:
    """All component dicts of a serialized normalizer/pre-tokenizer/decoder (Sequences flattened)."""
    if node is None:
        return []
    if isinstance(node, list):
        return [c for item in node for c in _components(item)]
    found = [node]
    for key in ("normalizers", "pretokenizers", "decoders", "processors"):
        found += _components(node.get(key))
    return found


def tokenizer_style(tokenizer) -> tuple[str, str | None]:
    """`("byte_level", None)`, `("metaspace", replacement_char)` or `("plain", None)`.

    Detected from the serialized pipeline: a ByteLevel pre-tokenizer/decoder means GPT-2 bytes; a
    Metaspace component or a Replace involving "▁" (Gemma's normalizer) means SentencePiece-style.
    """
    state = backend_state(tokenizer)
    model_type = state["model"]["type"]
    if model_type not in ("BPE", "Unigram"):
        raise ValueError(f"Unsupported tokenizer model {model_type!r}: byte-canonical overlap supports BPE and Unigram")
    if state["model"].get("continuing_subword_prefix") or state["model"].get("end_of_word_suffix"):
        raise ValueError("BPE tokenizers with continuing_subword_prefix/end_of_word_suffix are not supported")
    parts = [*_components(state.get("pre_tokenizer")), *_components(state.get("decoder"))]
    if any(c.get("type") == "ByteLevel" for c in parts):
        return "byte_level", None
    parts += _components(state.get("normalizer"))
    for c in parts:
        if c.get("type") == "Metaspace":
            return "metaspace", c.get("replacement", "▁")
        if c.get("type") == "Replace" and "▁" in json.dumps(c, ensure_ascii=False):
            return "metaspace", "▁"
    return "plain", None


# --------------------------------------------------------------------------------------------------
# Canonical bytes
# --------------------------------------------------------------------------------------------------
def _id_to_token(tokenizer) -> list[str | None]:
    """Token string for every id 0..len(tokenizer)-1 (None for holes)."""
    size = len(tokenizer)
    tokens: list[str | None] = [None] * size
    for token, idx in tokenizer.get_vocab().items():
        if idx >= size:
            raise ValueError(
                f"Token {token!r} has id {idx} >= len(tokenizer)={size}: token ids must be 0..len(tokenizer)-1"
            )
        tokens[idx] = token
    return tokens


def token_bytes(tokenizer) -> list[bytes | None]:
    """The byte string each token id stands for; None for special tokens and unmappable tokens.

    Non-special added tokens (matched verbatim in raw text) stand for their UTF-8 content.
    """
    style, replacement = tokenizer_style(tokenizer)
    byte_fallback = bool(backend_state(tokenizer)["model"].get("byte_fallback"))
    specials = special_token_ids(tokenizer)
    added = {i for i in tokenizer.added_tokens_decoder if i not in specials}
    char_to_byte = byte_level_decoder()
    result: list[bytes | None] = []
    unmappable = []
    for idx, token in enumerate(_id_to_token(tokenizer)):
        if token is None or idx in specials:
            result.append(None)
            continue
        if idx in added:
            result.append(token.encode("utf-8"))
            continue
        if style == "byte_level":
            if all(ch in char_to_byte for ch in token):
                result.append(bytes(char_to_byte[ch] for ch in token))
            else:
                unmappable.append(token)
                result.append(None)
        elif byte_fallback and (match := _BYTE_FALLBACK.fullmatch(token)):  # any non-byte-level style
            result.append(bytes([int(match.group(1), 16)]))
        elif style == "metaspace":
            result.append(token.replace(replacement, " ").encode("utf-8"))
        else:
            result.append(token.encode("utf-8"))
    if unmappable:
        logger.warning("%d byte-level tokens contain characters outside the byte alphabet and are treated as "
                       "unmatched (first: %r)", len(unmappable), unmappable[:5])
    return result


# --------------------------------------------------------------------------------------------------
# Overlap
# --------------------------------------------------------------------------------------------------
@dataclass
class TokenOverlap:
    """Shared tokens between a teacher and a student vocabulary (student id -> teacher id)."""

    student_to_teacher: dict[int, int]
    student_vocab_size: int
    """`len(student_tokenizer)` (added tokens included)."""
    teacher_vocab_size: int
    num_special_matched: int = 0
    details: dict[str, int] = field(default_factory=dict)

    @property
    def num_shared(self) -> int:
        return len(self.student_to_teacher)

    @property
    def num_new(self) -> int:
        return self.student_vocab_size - self.num_shared

    @property
    def ratio(self) -> float:
        """Shared tokens / student vocabulary."""
        return self.num_shared / self.student_vocab_size if self.student_vocab_size else 0.0

    def frozen_mask(self) -> torch.BoolTensor:
        """True for shared student tokens (their embeddings are copied and kept frozen)."""
        mask = torch.zeros(self.student_vocab_size, dtype=torch.bool)
        mask[list(self.student_to_teacher)] = True
        return mask

    def summary(self) -> dict[str, Any]:
        return {
            "student_vocab_size": self.student_vocab_size,
            "teacher_vocab_size": self.teacher_vocab_size,
            "num_shared": self.num_shared,
            "num_new": self.num_new,
            "ratio": self.ratio,
            "num_special_matched": self.num_special_matched,
            **self.details,
        }


def _match_specials(teacher, student) -> dict[int, int]:
    """Student special id -> teacher special id, by role first, then by identical content."""
    matched: dict[int, int] = {}
    for role in SPECIAL_ROLES:
        s_id = getattr(student, f"{role}_token_id", None)
        t_id = getattr(teacher, f"{role}_token_id", None)
        if s_id is not None and t_id is not None and s_id not in matched:
            matched[s_id] = t_id
    teacher_specials = {teacher.convert_ids_to_tokens(i): i for i in sorted(special_token_ids(teacher), reverse=True)}
    for s_id in sorted(special_token_ids(student)):
        if s_id not in matched:
            t_id = teacher_specials.get(student.convert_ids_to_tokens(s_id))
            if t_id is not None:
                matched[s_id] = t_id
    return matched


def token_overlap(teacher_tokenizer, student_tokenizer) -> TokenOverlap:
    """Map every student token whose bytes (or special role) exist in the teacher to that teacher id.

    When several teacher ids stand for the same bytes (e.g. "▁" and "<0x20>"), the one with the
    identical token string wins, otherwise the lowest id — deterministic either way.
    """
    teacher_bytes = token_bytes(teacher_tokenizer)
    student_bytes = token_bytes(student_tokenizer)
    teacher_tokens = _id_to_token(teacher_tokenizer)
    student_tokens = _id_to_token(student_tokenizer)

    by_bytes: dict[bytes, list[int]] = {}
    for t_id, b in enumerate(teacher_bytes):
        if b is not None:
            by_bytes.setdefault(b, []).append(t_id)  # ascending ids

    mapping: dict[int, int] = {}
    for s_id, b in enumerate(student_bytes):
        candidates = by_bytes.get(b) if b is not None else None
        if candidates:
            same_string = [t for t in candidates if teacher_tokens[t] == student_tokens[s_id]]
            mapping[s_id] = same_string[0] if same_string else candidates[0]
    specials = _match_specials(teacher_tokenizer, student_tokenizer)
    mapping.update(specials)

    overlap = TokenOverlap(
        student_to_teacher=dict(sorted(mapping.items())),
        student_vocab_size=len(student_tokenizer),
        teacher_vocab_size=len(teacher_tokenizer),
        num_special_matched=len(specials),
        details={
            "teacher_style": tokenizer_style(teacher_tokenizer)[0],
            "student_style": tokenizer_style(student_tokenizer)[0],
        },
    )
    logger.info("Token overlap: %d of %d student tokens shared with the teacher (%.1f%%), %d new",
                overlap.num_shared, overlap.student_vocab_size, 100 * overlap.ratio, overlap.num_new)
    return overlap
