"""Student tokenizers: a new vocabulary trained like the teacher's, or the teacher's vocabulary extended.

Both keep the teacher's text pipeline (normalizer, pre-tokenizer, decoder, post-processor) and its
special tokens, so that the student splits text into words exactly as the teacher does and only the
vocabulary differs. That is what makes the two tokenizations alignable into shared segments.

- `train_tokenizer_like`: a fresh BPE or Unigram vocabulary on target-language text (vocabulary
  replacement).
- `extend_tokenizer`: the paper's vocabulary extension (Gemma 3: 262K -> 387K). The teacher's tokens
  keep their ids and merges; BPE training continues from the teacher's segmentation of the target
  text, and the new tokens and merges are appended after the teacher's, so only text the teacher
  would split further gets merged into fewer tokens.
"""

from __future__ import annotations

import heapq
import json
import logging
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from typing import Literal

from tokenizers import AddedToken, Tokenizer
from transformers import PreTrainedTokenizerFast

from matt.segmentation import backend_state

logger = logging.getLogger(__name__)

TokenizerKind = Literal["bpe", "unigram"]
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]
_SPECIAL_ATTRIBUTES = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------
def _wrap_like(template, backend: Tokenizer) -> PreTrainedTokenizerFast:
    """A `PreTrainedTokenizerFast` around `backend` with `template`'s special tokens and chat template.

    The backend's post-processor is kept as is (it already adds BOS/EOS the teacher's way)."""
    kwargs = {name: str(getattr(template, name)) for name in _SPECIAL_ATTRIBUTES
              if getattr(template, name, None) is not None}
    extra = [str(t) for t in (getattr(template, "extra_special_tokens", None) or [])]
    if extra:
        kwargs["extra_special_tokens"] = extra
    if getattr(template, "chat_template", None):
        kwargs["chat_template"] = template.chat_template
    kwargs["model_max_length"] = template.model_max_length
    kwargs["padding_side"] = template.padding_side
    return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)


def _empty_model(state: dict, kind: TokenizerKind, unk_token: str | None) -> dict:
    """An untrained `kind` model that keeps the teacher model's byte-fallback/unk behaviour."""
    teacher_model = state["model"]
    byte_fallback = bool(teacher_model.get("byte_fallback", False))
    if kind == "bpe":
        return {
            "type": "BPE", "dropout": None, "unk_token": unk_token, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": bool(teacher_model.get("fuse_unk", False)),
            "byte_fallback": byte_fallback, "ignore_merges": bool(teacher_model.get("ignore_merges", False)),
            "vocab": {}, "merges": [],
        }
    if kind == "unigram":
        return {
            "type": "Unigram", "unk_id": 0 if unk_token else None,
            "vocab": [[unk_token, 0.0]] if unk_token else [], "byte_fallback": byte_fallback,
        }
    raise ValueError(f"Unknown tokenizer kind {kind!r}; choose 'bpe' or 'unigram'")


def append_byte_tokens(backend: Tokenizer) -> Tokenizer:
    """Give a byte-fallback model its 256 <0xNN> tokens (trainers cannot learn them: they never
    appear in text), appended after the trained vocabulary."""
    state = json.loads(backend.to_str())
    model = state["model"]
    model["byte_fallback"] = True  # the Unigram trainer drops the flag
    if model["type"] == "BPE":
        vocab = model["vocab"]
        next_id = max([*vocab.values(), *(t["id"] for t in state["added_tokens"])], default=-1) + 1
        for token in BYTE_TOKENS:
            if token not in vocab:
                vocab[token] = next_id
                next_id += 1
    else:  # Unigram: ids are list positions; a low score keeps bytes out of normal segmentation
        pieces = {piece for piece, _ in model["vocab"]}
        floor = min((score for _, score in model["vocab"]), default=0.0) - 10.0
        model["vocab"] += [[token, floor] for token in BYTE_TOKENS if token not in pieces]
    return Tokenizer.from_str(json.dumps(state))


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------
def train_tokenizer_like(
    teacher_tokenizer,
    texts: Iterable[str],
    vocab_size: int,
    *,
    kind: TokenizerKind = "bpe",
    show_progress: bool = False,
) -> PreTrainedTokenizerFast:
    """Train a `kind` ("bpe" or "unigram") tokenizer on `texts` with the teacher's pipeline and specials.

    With a byte-fallback teacher (Llama 2 / Mistral / Gemma style) 256 of `vocab_size` are reserved
    for the <0xNN> byte tokens, so no character is ever unknown. The teacher's non-special added
    tokens are re-added after training. `vocab_size` is an upper bound: small corpora may yield fewer.
    """
    state = backend_state(teacher_tokenizer)
    byte_fallback = bool(state["model"].get("byte_fallback", False))
    num_specials = len(teacher_tokenizer.all_special_tokens)
    reserved = len(BYTE_TOKENS) if byte_fallback else 0
    if vocab_size <= reserved + num_specials:
        raise ValueError(f"vocab_size={vocab_size} leaves no room for learned tokens ({num_specials} special "
                         f"tokens{' + 256 byte-fallback tokens' if reserved else ''})")
    shell_state = {**state, "model": _empty_model(state, kind, teacher_tokenizer.unk_token)}
    shell = _wrap_like(teacher_tokenizer, Tokenizer.from_str(json.dumps(shell_state)))

    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("No (non-empty) texts to train the tokenizer on")
    trained = shell.train_new_from_iterator(texts, vocab_size=vocab_size - reserved, show_progress=show_progress)
    backend = trained.backend_tokenizer
    if byte_fallback:
        backend = append_byte_tokens(backend)
    student = _wrap_like(teacher_tokenizer, backend)
    vocab = student.get_vocab()
    student.add_tokens([AddedToken(t.content, single_word=t.single_word, lstrip=t.lstrip, rstrip=t.rstrip,
                                   normalized=t.normalized, special=False)
                        for _, t in sorted(teacher_tokenizer.added_tokens_decoder.items())
                        if not t.special and t.content not in vocab])
    logger.info("Trained a %s tokenizer with %d tokens (requested %d)", kind, len(student), vocab_size)
    return student


_WORD_START_MARKERS = ("▁", "Ġ")
_ASCII_DIGIT = re.compile("[0-9]")


def _non_mergeable_tokens(tokenizer) -> set[str]:
    """Added/special tokens, byte-fallback tokens and the unknown token: never part of a new merge."""
    model = tokenizer.backend_tokenizer.model
    excluded = set(tokenizer.added_tokens_encoder)
    if getattr(model, "byte_fallback", False):
        excluded.update(BYTE_TOKENS)
    if getattr(model, "unk_token", None):
        excluded.add(model.unk_token)
    return excluded


def _keeps_digits_alone(tokenizer) -> bool:
    """True when no ordinary token of `tokenizer` holds an ASCII digit next to anything else."""
    excluded = _non_mergeable_tokens(tokenizer)
    return not any(len(token) > 1 and _ASCII_DIGIT.search(token)
                   for token in tokenizer.get_vocab() if token not in excluded)


def teacher_token_runs(teacher_tokenizer, texts: Iterable[str]) -> Counter[tuple[str, ...]]:
    """The teacher's tokens of `texts`, cut into runs that a new merge may join, with their counts.

    A run ends at every pre-token boundary and before every token that starts a word (`▁`/`Ġ`);
    added/special tokens, byte-fallback tokens and the unknown token are never part of a run, nor
    are tokens with an ASCII digit when the teacher keeps every digit a token of its own (Gemma,
    SmolLM2, Llama 2: numbers stay digit by digit after the extension too). So a merge learned
    inside runs never needs a right part that starts a word, which is what keeps the extended
    tokenizer's encoding (teacher merges first, then the new ones by rank) identical to the
    segmentation the merges were learned on.
    """
    backend = teacher_tokenizer.backend_tokenizer
    excluded = _non_mergeable_tokens(teacher_tokenizer)
    lone_digits = _keeps_digits_alone(teacher_tokenizer)
    runs: Counter[tuple[str, ...]] = Counter()
    texts = [t for t in texts if t]
    for start in range(0, len(texts), 256):
        for encoding in backend.encode_batch(texts[start:start + 256], add_special_tokens=False):
            run: list[str] = []
            last_word = None
            for token, word in zip(encoding.tokens, encoding.word_ids):
                outside = token in excluded or (lone_digits and _ASCII_DIGIT.search(token) is not None)
                if run and (word != last_word or token.startswith(_WORD_START_MARKERS) or outside):
                    runs[tuple(run)] += 1
                    run = []
                if not outside:
                    run.append(token)
                last_word = word
            if run:
                runs[tuple(run)] += 1
    return runs


def learn_continued_merges(
    runs: Counter[tuple[str, ...]], known_tokens: set[str], num_new_tokens: int, min_frequency: int = 2,
) -> tuple[list[tuple[str, str]], list[str], Counter[tuple[str, ...]]]:
    """Continue BPE training on top of an existing segmentation (`runs`, from `teacher_token_runs`).

    Repeatedly merges the most frequent adjacent pair (ties: the smaller pair) everywhere, until
    `num_new_tokens` tokens not in `known_tokens` exist or no pair occurs `min_frequency` times.
    A pair whose concatenation is already a known token is never merged: such a merge could re-enable
    the teacher's own merges out of order. Returns the merges in learned order, the new tokens in
    creation order and the final segmentation of the runs.
    """
    words = [list(run) for run in runs]
    freqs = list(runs.values())
    pair_counts: Counter[tuple[str, str]] = Counter()
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += freqs[i]
            where[pair].add(i)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    new_tokens: list[str] = []
    created: set[str] = set()
    while heap and len(new_tokens) < num_new_tokens:
        negative_count, pair = heapq.heappop(heap)
        count = pair_counts.get(pair, 0)
        if count != -negative_count:  # stale entry: counts changed since it was pushed
            if count > 0:
                heapq.heappush(heap, (-count, pair))
            continue
        if count < min_frequency:
            break
        left, right = pair
        merged = left + right
        if merged in known_tokens:
            continue  # dropped for good: the push below skips pairs that make a known token
        if merged not in created:
            created.add(merged)
            new_tokens.append(merged)
        merges.append(pair)
        touched: set[tuple[str, str]] = set()
        for i in where.pop(pair, ()):
            word, freq = words[i], freqs[i]
            out: list[str] = []
            j = 0
            while j < len(word):
                if j + 1 < len(word) and word[j] == left and word[j + 1] == right:
                    out.append(merged)
                    j += 2
                else:
                    out.append(word[j])
                    j += 1
            if len(out) == len(word):
                continue
            for old in zip(word, word[1:]):
                pair_counts[old] -= freq
            for new in zip(out, out[1:]):
                pair_counts[new] += freq
                where[new].add(i)
                touched.add(new)
            words[i] = out
        pair_counts.pop(pair, None)
        for new in touched:
            if new in pair_counts and (new[0] + new[1]) not in known_tokens:
                heapq.heappush(heap, (-pair_counts[new], new))
    final = Counter()
    for word, freq in zip(words, freqs):
        final[tuple(word)] += freq
    return merges, new_tokens, final


def extend_tokenizer(
    teacher_tokenizer,
    texts: Iterable[str],
    num_new_tokens: int,
    *,
    min_frequency: int = 2,
) -> PreTrainedTokenizerFast:
    """Append up to `num_new_tokens` target-language tokens (and their merges) to a BPE teacher.

    BPE training is continued from the teacher's own segmentation of `texts`: the most frequent
    adjacent pair of teacher tokens inside a word becomes a new merge, and so on (see
    `learn_continued_merges`). Teacher tokens keep their ids 0..len(teacher)-1; new ids follow in
    learned order; the new merges rank after all teacher merges. Tokenization therefore first
    reproduces the teacher's and then merges further, exactly as during learning, so every new token
    is produced on the target text or is a step towards a longer one (merges taken from a separately
    trained target BPE mostly are neither: its pairs rarely match the teacher's segmentation), and
    never more tokens than the teacher come out on any text.
    """
    if num_new_tokens < 1:
        raise ValueError(f"num_new_tokens must be >= 1, got {num_new_tokens}")
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")
    state = backend_state(teacher_tokenizer)
    model = state["model"]
    if model["type"] != "BPE":
        raise ValueError(f"extend_tokenizer supports BPE teachers only; this teacher's model is {model['type']!r}")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise ValueError("extend_tokenizer does not support BPE with continuing_subword_prefix/end_of_word_suffix")
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("No (non-empty) texts to learn the new tokens from")

    vocab: dict[str, int] = dict(model["vocab"])
    # Added tokens beyond the model vocabulary (Llama 3's reserved specials, Qwen's chat markers) get
    # their ids only implicitly, from the model's size, when a tokenizer is deserialized: appending
    # new model tokens would shift them onto the new tokens' ids. Pin them in the model vocabulary.
    for token in state["added_tokens"]:
        vocab.setdefault(token["content"], token["id"])
    runs = teacher_token_runs(teacher_tokenizer, texts)
    merges, new_tokens, _ = learn_continued_merges(runs, set(vocab), num_new_tokens, min_frequency)
    if len(new_tokens) < num_new_tokens:
        logger.warning("Only %d new tokens occur at least %d times in the %d texts (asked for %d): give more "
                       "text or lower min_frequency", len(new_tokens), min_frequency, len(texts), num_new_tokens)
    next_id = max(vocab.values(), default=-1) + 1
    for offset, token in enumerate(new_tokens):
        vocab[token] = next_id + offset

    as_lists = not model["merges"] or isinstance(model["merges"][0], list)  # JSON spells a merge ["a", "b"] or "a b"
    model["vocab"] = vocab
    model["merges"] += [[a, b] if as_lists else f"{a} {b}" for a, b in merges]
    extended = _wrap_like(teacher_tokenizer, Tokenizer.from_str(json.dumps(state)))
    logger.info("Extended the teacher vocabulary from %d to %d tokens (%d new merges)",
                len(teacher_tokenizer), len(extended), len(merges))
    return extended
