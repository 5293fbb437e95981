"""Segments shared by two tokenizations of the same text.

AIM compares teacher and student attention *per segment*, so both sides need the same segments.
A segment is a span of text that both tokenizations cut out the same way: its ends are positions
where *both* tokenizers have a token boundary, and between two consecutive common boundaries there
is no further common one (the finest consistent cut; a segment may end mid-word when both agree).

Positions are counted in **non-whitespace coordinates** (the number of non-whitespace characters
before a character offset). Tokenizers disagree about whitespace: GPT-2 style "Ġword" owns the
space before a word, SentencePiece style "▁word" too but with a prepended "▁" at the start, others
emit separate space tokens or trim the space from offsets. Ignoring whitespace makes all of these
the same token boundaries.

Rules, in those coordinates (N non-whitespace characters in the text):

* A token is *empty* when its offsets cover only whitespace (or nothing). Only the tokens a
  tokenizer *inserts* are not content: the post-processor's BOS/EOS and any other zero-width
  special token get segment id -100. A token matched from the text covers characters and takes
  part like any content token, whatever its flags: a chat marker (`<|im_start|>`) or a literal
  "<s>" written in the document is a special token for one tokenizer and plain characters for
  another, and both sides must still cover the same characters. Likewise an unknown token
  (`[UNK]`/`<unk>`) produced from text.
* A position p is a *cut* of a tokenization when some non-empty token starts at p, p is after the
  first such start, and no non-empty token strictly straddles p (a < p < b). Byte-level tokens of
  one multi-byte character share the character's offsets, so they never straddle each other;
  tokens whose characters overlap always end up in the same segment.
* Segment starts are 0 plus the common cuts; segment k spans [start_k, start_{k+1}) with
  start_S = N. A non-empty token [a, b) belongs to the segment containing a.
* An empty token at position k joins the segment containing character k (the *following*
  non-whitespace character), or the last segment at the end of the text. Both "Ġ"/"▁" styles
  attach spaces to the next word, so this is the side where a lone space token of one
  tokenizer is merged into a token of the other.

Why every segment has at least one token on each side: for k >= 1, start_k is a common cut, so on
each side a non-empty token starts there; it cannot straddle start_{k+1} (also a cut, or N), so
it lies in segment k. Segment 0 holds each side's first non-empty token, because cuts are
strictly after the first start. `_assign` also asserts it.
"""

from __future__ import annotations

import bisect
import json
import logging
import weakref
from dataclasses import asdict, dataclass, field, fields
from itertools import accumulate

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Segment id of special and padding tokens (PyTorch's conventional ignore index)."""

_WARN_FIRST = 3
"""Skips of each kind logged at WARNING per stats object; later ones at DEBUG (counted anyway)."""


@dataclass
class AlignedExample:
    """One training example: both tokenizations of the same text with shared segment ids."""

    teacher_input_ids: list[int]
    teacher_segment_ids: list[int]
    student_input_ids: list[int]
    student_segment_ids: list[int]

    @property
    def num_segments(self) -> int:
        return max(self.teacher_segment_ids, default=-1) + 1


@dataclass
class SegmentationStats:
    """What happened to the documents of a segmentation run; skips are counted, never silent."""

    documents: int = 0
    """Documents seen (including skipped ones)."""
    examples: int = 0
    """Examples produced (a long document gives several)."""
    skipped_empty: int = 0
    """Documents with no common segment (empty, whitespace-only, nothing tokenized)."""
    skipped_not_text: int = 0
    """Entries that were not strings (None, numbers, ...)."""
    skipped_unordered: int = 0
    """Documents whose tokens were not in text order (segment ids would not be contiguous)."""
    skipped_segments: int = 0
    """Single segments longer than `max_length` on one side, dropped from their document."""
    _warned: dict[str, int] = field(default_factory=dict, repr=False, compare=False)

    @property
    def skipped_documents(self) -> int:
        return self.skipped_empty + self.skipped_not_text + self.skipped_unordered

    def record_skip(self, kind: str, detail: str) -> None:
        """Count one skip of `kind` (a field name) and log it."""
        setattr(self, kind, getattr(self, kind) + 1)
        seen = self._warned.get(kind, 0) + 1
        self._warned[kind] = seen
        level = logging.WARNING if seen <= _WARN_FIRST else logging.DEBUG
        suffix = " (further skips of this kind are logged at DEBUG)" if seen == _WARN_FIRST else ""
        logger.log(level, "Segmentation skip [%s]: %s%s", kind, detail, suffix)

    def update(self, other: "SegmentationStats") -> None:
        """Add `other`'s counts to these (e.g. to merge per-batch stats)."""
        for name in self.counter_names():
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @classmethod
    def counter_names(cls) -> list[str]:
        return [f.name for f in fields(cls) if not f.name.startswith("_")]

    def as_dict(self) -> dict[str, int]:
        return {name: value for name, value in asdict(self).items() if not name.startswith("_")}

    def summary(self) -> str:
        return (f"{self.documents} documents -> {self.examples} examples; skipped documents: "
                f"{self.skipped_empty} empty, {self.skipped_not_text} not text, {self.skipped_unordered} "
                f"unordered; skipped over-long segments: {self.skipped_segments}")


# ----------------------------------------------------------------------------------------------
# tokenization with offsets
# ----------------------------------------------------------------------------------------------
def check_offsets_support(tokenizer, name: str = "tokenizer") -> None:
    """Raise `ValueError` unless `tokenizer` is a fast tokenizer (character offsets are required).

    Slow (Python) tokenizers silently ignore `return_offsets_mapping`, so this must be checked
    up front rather than discovered as a confusing error later."""
    if not getattr(tokenizer, "is_fast", False):
        path = getattr(tokenizer, "name_or_path", "") or "<no name>"
        raise ValueError(
            f"{name} ({type(tokenizer).__name__}, {path!r}) is not a fast tokenizer: segmentation "
            "requires character offsets (return_offsets_mapping), which only fast (Rust `tokenizers`) "
            "tokenizers provide. Load it with AutoTokenizer.from_pretrained(..., use_fast=True) or "
            "convert it to a `tokenizers` tokenizer."
        )


def backend_state(tokenizer) -> dict:
    """The serialized `tokenizers` pipeline of a fast tokenizer, as a dict."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(f"{type(tokenizer).__name__} is not a fast (tokenizers-backed) tokenizer; load it with "
                        "AutoTokenizer.from_pretrained(..., use_fast=True)")
    return json.loads(backend.to_str())


@dataclass(frozen=True)
class _Tokenized:
    input_ids: list[int]
    offsets: list[tuple[int, int]]
    special: list[bool]


_SPECIAL_IDS_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def special_token_ids(tokenizer) -> set[int]:
    """Ids of the tokenizer's special tokens: the named ones and added tokens flagged special
    (e.g. chat markers added with `add_tokens(..., special_tokens=True)`).

    Cached per tokenizer: listing the added tokens costs milliseconds when there are thousands
    (Gemma), far more than tokenizing a document. Adding a token or changing a role invalidates it."""
    named = tuple(getattr(tokenizer, "all_special_ids", ()) or ())
    key = (named, len(tokenizer))
    cached = _SPECIAL_IDS_CACHE.get(tokenizer)
    if cached is not None and cached[0] == key:
        return cached[1]
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids = frozenset(named).union(i for i, token in added.items() if token.special)
    _SPECIAL_IDS_CACHE[tokenizer] = (key, ids)
    return ids


def unknown_token_id(tokenizer) -> int | None:
    """The unknown token's id: the wrapper's `unk_token`, else the one the backend model names.

    `PreTrainedTokenizerFast(tokenizer_file=...)` / `(tokenizer_object=...)` without `unk_token=`
    (the usual wrapping of a `tokenizers` tokenizer) leaves the wrapper's unset although the model
    produces `[UNK]`."""
    unk_id = getattr(tokenizer, "unk_token_id", None)
    if unk_id is not None:
        return unk_id
    backend = getattr(tokenizer, "backend_tokenizer", None)
    unk_token = getattr(getattr(backend, "model", None), "unk_token", None)
    return backend.token_to_id(unk_token) if unk_token else None


def _tokenize(text: str, tokenizer, name: str) -> _Tokenized:
    """Tokenize with offsets and flag the inserted tokens (segment id -100).

    `special_tokens_mask` flags the tokens the post-processor inserts (BOS/EOS); a special token
    with zero width is inserted too. Tokens matched from the text (chat markers, a literal "<s>",
    the unknown token) cover characters and are content (see the module docstring)."""
    check_offsets_support(tokenizer, name)
    enc = tokenizer(text, return_offsets_mapping=True, return_special_tokens_mask=True, truncation=False)
    special_ids = special_token_ids(tokenizer)
    unk_id = unknown_token_id(tokenizer)
    special = [
        bool(mask) or (start == end and token_id in special_ids and token_id != unk_id)
        for token_id, mask, (start, end) in zip(enc["input_ids"], enc["special_tokens_mask"], enc["offset_mapping"])
    ]
    offsets = [(int(start), int(end)) for start, end in enc["offset_mapping"]]
    return _Tokenized(list(enc["input_ids"]), offsets, special)


# ----------------------------------------------------------------------------------------------
# the segmentation itself
# ----------------------------------------------------------------------------------------------
def _non_whitespace_prefix(text: str) -> list[int]:
    """`prefix[i]` = number of non-whitespace characters in `text[:i]` (length len(text)+1)."""
    return list(accumulate((not char.isspace() for char in text), initial=0))


def _spans(tok: _Tokenized, prefix: list[int]) -> list[tuple[int, int] | None]:
    """Each token's span in non-whitespace coordinates; None for special tokens."""
    last = len(prefix) - 1
    spans: list[tuple[int, int] | None] = []
    for (start, end), special in zip(tok.offsets, tok.special):
        if special:
            spans.append(None)
            continue
        start = min(max(start, 0), last)
        end = min(max(end, start), last)
        spans.append((prefix[start], prefix[end]))
    return spans


def _cuts(spans: list[tuple[int, int] | None], n: int) -> set[int]:
    """Positions where this tokenization may be cut (see module docstring)."""
    non_empty = [span for span in spans if span is not None and span[0] < span[1]]
    if not non_empty:
        return set()
    straddled = [0] * (n + 1)  # difference array: +1 on a+1 .. b-1
    for start, end in non_empty:
        if end - start > 1:
            straddled[start + 1] += 1
            straddled[end] -= 1
    inside = [running > 0 for running in accumulate(straddled)]
    first = min(start for start, _ in non_empty)
    return {start for start, _ in non_empty if start > first and not inside[start]}


def _assign(spans: list[tuple[int, int] | None], starts: list[int]) -> list[int]:
    """Segment id of each token, given the sorted segment starts."""
    ids = []
    counts = [0] * len(starts)
    for span in spans:
        if span is None:
            ids.append(IGNORE_INDEX)
            continue
        segment = bisect.bisect_right(starts, span[0]) - 1
        ids.append(segment)
        if span[0] < span[1]:
            counts[segment] += 1
    if not all(counts):
        raise AssertionError(f"segment without a non-empty token: {counts}")  # impossible, see module doc
    return ids


def _segment(text: str, teacher_tokenizer, student_tokenizer):
    """Both tokenizations, their segment ids and the number of segments S (0: no common segment)."""
    teacher = _tokenize(text, teacher_tokenizer, "teacher_tokenizer")
    student = _tokenize(text, student_tokenizer, "student_tokenizer")
    prefix = _non_whitespace_prefix(text)
    n = prefix[-1]
    teacher_spans, student_spans = _spans(teacher, prefix), _spans(student, prefix)
    teacher_cuts, student_cuts = _cuts(teacher_spans, n), _cuts(student_spans, n)
    has_content = n > 0 and all(
        any(span is not None and span[0] < span[1] for span in spans) for spans in (teacher_spans, student_spans)
    )
    if not has_content:
        return teacher, [IGNORE_INDEX] * len(teacher.input_ids), student, [IGNORE_INDEX] * len(student.input_ids), 0
    starts = [0, *sorted(teacher_cuts & student_cuts)]
    return teacher, _assign(teacher_spans, starts), student, _assign(student_spans, starts), len(starts)


def segment_ids(text: str, teacher_tokenizer, student_tokenizer) -> tuple[list[int], list[int]]:
    """Shared segment ids of `text` for each tokenizer, aligned with `tokenizer(text)["input_ids"]`.

    Inserted tokens (BOS/EOS) get -100; content tokens, special tokens matched from the text
    included, get 0..S-1 in text order, with the same S on both sides. If the text has no common
    segment (empty, whitespace only) every id is -100."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    _, teacher_ids, _, student_ids, _ = _segment(text, teacher_tokenizer, student_tokenizer)
    return teacher_ids, student_ids


# ----------------------------------------------------------------------------------------------
# documents -> examples of at most max_length tokens
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Layout:
    """One side of a document: leading specials, content tokens, trailing specials."""

    lead: list[int]
    content_ids: list[int]
    content_segments: list[int]
    trail: list[int]
    segment_starts: list[int]
    """Index in the content of the first token of each segment, plus len(content) at the end."""

    @classmethod
    def build(cls, tok: _Tokenized, segments: list[int], num_segments: int) -> "_Layout | None":
        """Split off the specials the tokenizer adds around the text (zero-width, id -100).

        None when content tokens are out of text order (a chunk would not be contiguous)."""
        def added(i: int) -> bool:
            return segments[i] == IGNORE_INDEX and tok.offsets[i][0] == tok.offsets[i][1]

        first, last = 0, len(segments)
        while first < last and added(first):
            first += 1
        while last > first and added(last - 1):
            last -= 1
        content_segments = segments[first:last]
        starts = [0] * (num_segments + 1)  # segment 0 also takes any special token before it
        previous = 0
        for position, segment in enumerate(content_segments):
            if segment == IGNORE_INDEX:  # a special token inside the text stays with its neighbours
                continue
            if segment < previous:
                return None
            for k in range(previous + 1, segment + 1):
                starts[k] = position
            previous = max(previous, segment)
        starts[num_segments] = len(content_segments)
        ids = tok.input_ids
        return cls(ids[:first], ids[first:last], content_segments, ids[last:], starts)

    def budget(self, max_length: int) -> int:
        return max_length - len(self.lead) - len(self.trail)

    def length(self, first_segment: int, end_segment: int) -> int:
        return self.segment_starts[end_segment] - self.segment_starts[first_segment]

    def chunk(self, first_segment: int, end_segment: int) -> tuple[list[int], list[int]]:
        lo, hi = self.segment_starts[first_segment], self.segment_starts[end_segment]
        segments = [s - first_segment if s != IGNORE_INDEX else IGNORE_INDEX for s in self.content_segments[lo:hi]]
        ignore = [IGNORE_INDEX]
        return (
            self.lead + self.content_ids[lo:hi] + self.trail,
            ignore * len(self.lead) + segments + ignore * len(self.trail),
        )


def segment_document(
    text: str,
    teacher_tokenizer,
    student_tokenizer,
    max_length: int,
    stats: SegmentationStats | None = None,
) -> list[AlignedExample]:
    """Segment one document into examples of at most `max_length` tokens on both sides.

    Long documents are cut at common segment boundaries (greedily, as many whole segments as fit
    on both sides) and continue as further examples; each keeps the tokenizer's leading and
    trailing special tokens (e.g. BOS) and numbers its segments from 0. A single segment that
    does not fit on its own is dropped (counted in `stats.skipped_segments`); documents without a
    common segment or that are not strings give no example (counted). `stats` is updated in place.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
    stats = stats if stats is not None else SegmentationStats()
    stats.documents += 1
    if not isinstance(text, str):
        stats.record_skip("skipped_not_text", f"entry of type {type(text).__name__} is not text")
        return []
    teacher, teacher_ids, student, student_ids, num_segments = _segment(text, teacher_tokenizer, student_tokenizer)
    if num_segments == 0:
        stats.record_skip("skipped_empty", f"no common segment in text {text[:40]!r}")
        return []
    teacher_layout = _Layout.build(teacher, teacher_ids, num_segments)
    student_layout = _Layout.build(student, student_ids, num_segments)
    if teacher_layout is None or student_layout is None:
        stats.record_skip("skipped_unordered", f"tokens out of text order in {text[:40]!r}")
        return []
    layouts = (teacher_layout, student_layout)
    for side, layout in (("teacher", teacher_layout), ("student", student_layout)):
        if layout.budget(max_length) < 1:
            raise ValueError(f"max_length={max_length} leaves no room for text next to the {side} tokenizer's "
                             f"{len(layout.lead) + len(layout.trail)} special tokens")

    examples = []
    first = 0
    while first < num_segments:
        end = first
        while end < num_segments and all(
            layout.length(first, end + 1) <= layout.budget(max_length) for layout in layouts
        ):
            end += 1
        if end == first:
            stats.record_skip(
                "skipped_segments",
                f"segment of {teacher_layout.length(first, first + 1)} teacher / "
                f"{student_layout.length(first, first + 1)} student tokens exceeds max_length={max_length}",
            )
            first += 1
            continue
        t_ids, t_seg = teacher_layout.chunk(first, end)
        s_ids, s_seg = student_layout.chunk(first, end)
        examples.append(AlignedExample(t_ids, t_seg, s_ids, s_seg))
        first = end
    stats.examples += len(examples)
    return examples
