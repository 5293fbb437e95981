"""Student tokenizers: a new vocabulary trained like the teacher's, or the teacher's vocabulary extended.

Both keep the teacher's text pipeline (normalizer, pre-tokenizer, decoder, post-processor) and its
special tokens, so that the student splits text into words exactly as the teacher does and only the
vocabulary differs. That is what makes the two tokenizations alignable into shared segments.

- `train_tokenizer_like`: a fresh BPE or Unigram vocabulary on target-language text (vocabulary
  replacement).
- `extend_tokenizer`: the paper's vocabulary extension (Gemma 3: 262K -> 387K). The teacher's tokens
  keep their ids and merges; the new tokens and their merges are appended after them, so only text
  the teacher would split further gets merged into fewer tokens.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from tokenizers import AddedToken, Tokenizer
from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

TokenizerKind = Literal["bpe", "unigram"]
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]
_SPECIAL_ATTRIBUTES = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------
def _state(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(f"{type(tokenizer).__name__} is not a fast tokenizer; a tokenizers-backed one is needed")
    return json.loads(backend.to_str())


def _wrap_like(template, backend: Tokenizer) -> PreTrainedTokenizerFast:
    """A `PreTrainedTokenizerFast` around `backend` with `template`'s special tokens and chat template.

    The backend's post-processor is kept as is (it already adds BOS/EOS the teacher's way)."""
    kwargs = {}
    for attribute in _SPECIAL_ATTRIBUTES:
        value = getattr(template, attribute, None)
        if value is not None:
            kwargs[attribute] = str(value)
    extra = [str(t) for t in (getattr(template, "extra_special_tokens", None) or [])]
    if extra:
        kwargs["extra_special_tokens"] = extra
    if getattr(template, "chat_template", None):
        kwargs["chat_template"] = template.chat_template
    kwargs["model_max_length"] = template.model_max_length
    kwargs["padding_side"] = template.padding_side
    return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)


def _non_special_added_tokens(tokenizer) -> list[AddedToken]:
    return [
        AddedToken(t.content, single_word=t.single_word, lstrip=t.lstrip, rstrip=t.rstrip,
                   normalized=t.normalized, special=False)
        for _, t in sorted(tokenizer.added_tokens_decoder.items())
        if not t.special
    ]


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


def _append_byte_tokens(backend: Tokenizer) -> Tokenizer:
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
    state = _state(teacher_tokenizer)
    byte_fallback = bool(state["model"].get("byte_fallback", False))
    num_specials = len(teacher_tokenizer.all_special_tokens)
    reserved = len(BYTE_TOKENS) if byte_fallback else 0
    if vocab_size <= reserved + num_specials:
        raise ValueError(f"vocab_size={vocab_size} leaves no room for learned tokens ({num_specials} special "
                         f"tokens{' + 256 byte-fallback tokens' if reserved else ''})")
    shell_state = dict(state)
    shell_state["model"] = _empty_model(state, kind, teacher_tokenizer.unk_token)
    shell = _wrap_like(teacher_tokenizer, Tokenizer.from_str(json.dumps(shell_state)))

    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("No (non-empty) texts to train the tokenizer on")
    trained = shell.train_new_from_iterator(texts, vocab_size=vocab_size - reserved, show_progress=show_progress)
    backend = trained.backend_tokenizer
    if byte_fallback:
        backend = _append_byte_tokens(backend)
    student = _wrap_like(teacher_tokenizer, backend)
    extra = [t for t in _non_special_added_tokens(teacher_tokenizer) if t.content not in student.get_vocab()]
    if extra:
        student.add_tokens(extra)
    logger.info("Trained a %s tokenizer with %d tokens (requested %d)", kind, len(student), vocab_size)
    return student


def _merge_pairs(model: dict) -> list[tuple[str, str]]:
    """Merges as pairs, whichever of the two JSON spellings ("a b" or ["a", "b"]) is used."""
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"]]


def extend_tokenizer(
    teacher_tokenizer,
    texts: Iterable[str],
    num_new_tokens: int,
    *,
    target_vocab_size: int | None = None,
    show_progress: bool = False,
) -> PreTrainedTokenizerFast:
    """Append up to `num_new_tokens` target-language tokens (and their merges) to a BPE teacher.

    A target BPE of `target_vocab_size` (default: `2 * num_new_tokens + 1000`) is trained like the
    teacher; its merges are walked in training order and every merge whose two parts exist in the
    growing vocabulary is appended after the teacher's merges, adding its result as a new token
    when the teacher lacks it, until `num_new_tokens` tokens were added. Base characters of the
    target alphabet that the teacher lacks (only possible with byte fallback) are added when a merge
    first needs them. Teacher tokens keep their ids 0..len(teacher)-1; new ids follow. Appended
    merges rank after all teacher merges, so tokenization first reproduces the teacher's and then
    merges further: never more tokens than the teacher on any text.
    """
    if num_new_tokens < 1:
        raise ValueError(f"num_new_tokens must be >= 1, got {num_new_tokens}")
    state = _state(teacher_tokenizer)
    model = state["model"]
    if model["type"] != "BPE":
        raise ValueError(f"extend_tokenizer supports BPE teachers only; this teacher's model is {model['type']!r}")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise ValueError("extend_tokenizer does not support BPE with continuing_subword_prefix/end_of_word_suffix")

    target = train_tokenizer_like(teacher_tokenizer, texts, target_vocab_size or 2 * num_new_tokens + 1000,
                                  kind="bpe", show_progress=show_progress)
    target_model = _state(target)["model"]
    target_merges = _merge_pairs(target_model)
    merge_results = {a + b for a, b in target_merges}
    target_alphabet = {tok for tok in target_model["vocab"] if tok not in merge_results}

    vocab: dict[str, int] = dict(model["vocab"])
    added_contents = {t["content"] for t in state["added_tokens"]}
    # Added tokens beyond the model vocabulary (Llama 3's reserved specials, Qwen's chat markers) get
    # their ids only implicitly, from the model's size, when a tokenizer is deserialized: appending
    # new model tokens would shift them onto the new tokens' ids. Pin them in the model vocabulary.
    for token in state["added_tokens"]:
        vocab.setdefault(token["content"], token["id"])
    next_id = max(vocab.values(), default=-1) + 1
    teacher_merges = _merge_pairs(model)
    known_merges = set(teacher_merges)
    new_merges: list[tuple[str, str]] = []
    added = skipped = 0

    def add_token(token: str) -> None:
        nonlocal next_id, added
        vocab[token] = next_id
        next_id += 1
        added += 1

    for a, b in target_merges:
        if added >= num_new_tokens:
            break
        for part in (a, b):
            if part not in vocab and part in target_alphabet and part not in added_contents and added < num_new_tokens:
                add_token(part)
        merged = a + b
        if a not in vocab or b not in vocab or merged in added_contents:
            skipped += 1
            continue
        if merged not in vocab:
            if added >= num_new_tokens:
                break
            add_token(merged)
        if (a, b) not in known_merges:
            known_merges.add((a, b))
            new_merges.append((a, b))

    if added < num_new_tokens:
        logger.warning("Only %d new tokens available (asked for %d): train the target tokenizer on more text or "
                       "raise target_vocab_size", added, num_new_tokens)
    if skipped:
        logger.info("Skipped %d target merges whose parts are not in the extended vocabulary", skipped)

    as_lists = not model["merges"] or isinstance(model["merges"][0], list)
    model["vocab"] = vocab
    model["merges"] = [[a, b] if as_lists else f"{a} {b}" for a, b in [*teacher_merges, *new_merges]]
    extended = _wrap_like(teacher_tokenizer, Tokenizer.from_str(json.dumps(state)))
    logger.info("Extended the teacher vocabulary from %d to %d tokens (%d new merges)",
                len(teacher_tokenizer), len(extended), len(new_merges))
    return extended


def save_tokenizer(tokenizer, path: str | Path) -> Path:
    """Save for `AutoTokenizer.from_pretrained(path)`; returns the directory."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(path))
    return path
