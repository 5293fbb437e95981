"""Initial student embeddings: copy what the teacher already knows, guess the rest.

Shared tokens (same bytes, see `matt.overlap`) copy the teacher's row bit for bit: the teacher's
layers already know what to do with it. New tokens are initialised by one of

- `focus`: FOCUS (Dobler & de Melo, 2023) through `deepfocus`. A small fastText model is trained on
  the target texts tokenized by the student tokenizer; a new token's row is the sparsemax-weighted
  convex combination of the teacher rows of shared tokens, weighted by fastText cosine similarity.
  Tokens fastText has no vector for (too rare, special) fall back to N(mean, std) of the teacher rows.
- `mean`: the exact mean of the teacher rows (no noise: training breaks the symmetry, since each
  token receives gradients from different contexts).
- `random`: N(mean, std) per dimension of the teacher rows.
- `subword_mean`: the mean of the teacher rows of the token's decomposition by the teacher
  tokenizer (the standard vocabulary-extension baseline). The token is mapped to the exact bytes it
  stands for (`matt.overlap.token_bytes`) and those bytes are encoded by the teacher without special
  tokens (see `teacher_decomposition`). Also FOCUS's fallback (`focus_fallback`) for the new tokens
  fastText has no vector for; tokens without bytes (unmatched special tokens) are drawn at random.

Teacher statistics use the rows of real tokens only (`len(teacher_tokenizer)` first rows), not the
padding rows some checkpoints carry (Gemma, Qwen). All random draws come from one `seed`ed generator.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from matt.digests import cache_key, text_digest
from matt.overlap import TokenOverlap, byte_level_decoder, token_bytes, token_overlap, tokenizer_style
from matt.segmentation import special_token_ids

logger = logging.getLogger(__name__)

InitMethod = Literal["focus", "mean", "random", "subword_mean"]
METHODS = ("focus", "mean", "random", "subword_mean")
KINDS = ("copied", "focus", "mean", "subword_mean", "random")
FOCUS_FALLBACKS = ("subword_mean", "random")
_MAX_SIMILARITY_ENTRIES = 2**26
"""Upper bound on new x shared entries per FOCUS chunk (deepfocus builds a dense float64 matrix)."""


@dataclass
class InitResult:
    """Student embeddings and how each row was obtained."""

    embeddings: Tensor
    """(len(student_tokenizer), D) float32."""
    overlap: TokenOverlap
    kinds: list[str]
    """Per student id: one of `KINDS`."""
    decompositions: dict[int, list[int]] = field(default_factory=dict)
    """Student id -> the teacher ids whose rows it averages (rows of kind `subword_mean`)."""

    @property
    def counts(self) -> dict[str, int]:
        return {kind: self.kinds.count(kind) for kind in KINDS}


# --------------------------------------------------------------------------------------------------
# fastText (trained here with deepfocus's settings) and deepfocus (the FOCUS combination)
# --------------------------------------------------------------------------------------------------
def train_token_fasttext(
    texts: Iterable[str],
    tokenizer,
    *,
    dim: int = 100,
    epochs: int = 3,
    min_count: int = 1,
    threads: int = 1,
    cache_dir: str | Path | None = None,
):
    """fastText (CBOW) vectors of `tokenizer`'s tokens, trained on `texts` tokenized by it.

    The training call is deepfocus's (each document on one line, whitespace collapsed, split into
    the tokenizer's tokens; CBOW, 10 negatives), with `min_count=1` (deepfocus defaults to 10) so
    that new tokens of a corpus of a few MB get vectors instead of random rows. One thread keeps
    training bit-reproducible (fastText's Hogwild updates are not with more).

    fastText's default 2M character n-gram buckets stay: the model holds (words + 2M) x `dim` floats
    (763 MiB at dim 100), so small runs lower `dim`. Fewer buckets made fastText 0.9.3 fail at random
    ("Encountered NaN", or different vectors from the same seed) on small corpora. With one thread,
    fastText draws random initial values for the first tenth of those rows only (the words and the
    first n-gram buckets); the rest start at zero.

    With `cache_dir`, the model is cached there under the digest of the tokenized text and the
    settings, written atomically: concurrent jobs sharing a cache never read a partial file."""
    import fasttext

    lines = [" ".join(text.split()) for text in texts]
    tokenized = "".join(" ".join(tokenizer.tokenize(line)) + "\n" for line in lines if line)
    if not tokenized:
        raise ValueError("FOCUS needs non-empty target-language `texts` to train fastText on")
    settings = {"dim": dim, "epochs": epochs, "min_count": min_count}
    cached = None
    if cache_dir is not None:
        cached = Path(cache_dir) / f"fasttext-{cache_key({**settings, 'tokens': text_digest(tokenized)})}.bin"
        if cached.exists():
            logger.info("Loading the cached fastText model %s", cached)
            return fasttext.load_model(str(cached))
    logger.info("Training fastText (dim=%d, epochs=%d, min_count=%d) on %d documents", dim, epochs, min_count,
                len(lines))
    with tempfile.TemporaryDirectory(prefix="matt-fasttext-") as scratch:
        corpus = Path(scratch) / "tokens.txt"
        corpus.write_text(tokenized, encoding="utf-8")
        try:
            model = fasttext.train_unsupervised(str(corpus), model="cbow", dim=dim, epoch=epochs, neg=10,
                                                minCount=min_count, thread=threads, verbose=0)
        except RuntimeError as err:  # fastText's only word on a diverged run (seen on tiny corpora)
            raise RuntimeError(f"fastText training failed ({err}) with {settings} on {len(lines)} documents") from err
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_name(f"{cached.name}.{os.getpid()}.partial")
        model.save_model(str(partial))
        os.replace(partial, cached)
    return model


def _token_class(token: str, idx: int, descriptor: str):
    from deepfocus.vocab_helper import TokenClass

    return TokenClass(native_form=token, id=idx, canonical_form=token, fuzzy_form=token, uncased_form=token,
                      no_whitespace_form=token, is_beginning_of_word=False, descriptor=descriptor)


def _focus_rows(
    target: Tensor,
    source: Tensor,
    overlap: TokenOverlap,
    new_ids: list[int],
    teacher_tokenizer,
    student_tokenizer,
    fasttext_model,
) -> list[int]:
    """Fill `target[new_ids]` that have a fastText vector with FOCUS; return the ids filled.

    Shared tokens with a fastText vector are the anchors (deepfocus's rule); the lookup set is built
    once because fastText's own `in` scans a list. Special tokens never take part: fastText always
    has a "</s>" line-end word, and a chat marker's contexts say nothing about its meaning.
    deepfocus prints through its own logger and per-call tqdm bars: both are silenced for the call."""
    import deepfocus.focus as focus
    import numpy as np
    from deepfocus.logger import logger as focus_logger
    from deepfocus.vocab_helper import NewToken, OverlappingToken
    from tqdm.auto import tqdm

    known = set(fasttext_model.words)
    specials = special_token_ids(student_tokenizer)  # named specials and added ones flagged special

    def vector(student_id: int):
        if student_id in specials:
            return None
        token = student_tokenizer.convert_ids_to_tokens(student_id)
        if token not in known:
            return None
        vec = fasttext_model.get_word_vector(token)
        return vec if np.abs(vec).sum() > 0 else None

    anchors = {}
    for s_id, t_id in overlap.student_to_teacher.items():
        vec = vector(s_id)
        if vec is not None:
            s_tok = student_tokenizer.convert_ids_to_tokens(s_id)
            anchors[s_tok] = OverlappingToken(
                source=[_token_class(teacher_tokenizer.convert_ids_to_tokens(t_id), t_id, "source")],
                target=_token_class(s_tok, s_id, "target"),
                source_embedding=source[t_id],
                auxiliary_embedding=vec,
            )
    if not anchors:
        logger.warning("No shared token has a fastText vector: FOCUS cannot initialise any new token")
        return []
    candidates = [(s_id, vec) for s_id in new_ids if (vec := vector(s_id)) is not None]

    chunk = max(1, _MAX_SIMILARITY_ENTRIES // len(anchors))
    saved = (focus_logger.mode, focus.tqdm)
    focus_logger.config(mode="silent")
    focus.tqdm = functools.partial(tqdm, disable=True)
    try:
        for start in tqdm(range(0, len(candidates), chunk), desc="FOCUS", unit="chunk", disable=None):
            new_tokens = {}
            for s_id, vec in candidates[start:start + chunk]:
                s_tok = student_tokenizer.convert_ids_to_tokens(s_id)
                new_tokens[s_tok] = NewToken(target=_token_class(s_tok, s_id, "target"), auxiliary_embedding=vec)
            focus.focus_additional_token_initialization(anchors, new_tokens, target, device=target.device)
    finally:
        focus_logger.mode, focus.tqdm = saved
    return [s_id for s_id, _ in candidates]


# --------------------------------------------------------------------------------------------------
# subword_mean: the teacher's decomposition of a new token
# --------------------------------------------------------------------------------------------------
def _spelled_pieces(tokenizer, data: bytes) -> list[int] | None:
    """The teacher's tokenization model (BPE/Unigram, no normalizer or pre-tokenizer) applied to the
    teacher's own spelling of `data`: byte-level characters for byte-level tokenizers, "▁" for spaces
    in Metaspace ones. Bytes that are no valid UTF-8 (a piece of a character) become the teacher's
    <0xNN> byte tokens there; None when it has none."""
    style, replacement = tokenizer_style(tokenizer)
    model = tokenizer.backend_tokenizer.model
    if style == "byte_level":
        char_of = {b: ch for ch, b in byte_level_decoder().items()}
        return [t.id for t in model.tokenize("".join(char_of[b] for b in data))] if data else []
    text = data.decode("utf-8", errors="surrogateescape")  # invalid bytes -> lone surrogates U+DC80..U+DCFF
    ids: list[int] = []
    for run in re.split("([\udc80-\udcff])", text):
        if len(run) == 1 and "\udc80" <= run <= "\udcff":
            byte_id = tokenizer.convert_tokens_to_ids(f"<0x{ord(run) - 0xDC00:02X}>")
            if byte_id is None or byte_id == tokenizer.unk_token_id:
                return None
            ids.append(byte_id)
        elif run:
            ids += [t.id for t in model.tokenize(run.replace(" ", replacement) if style == "metaspace" else run)]
    return ids


def teacher_decomposition(teacher_tokenizer, student_tokenizer, student_ids: Iterable[int]) -> dict[int, list[int]]:
    """For each student id: the teacher ids whose bytes concatenate to exactly the student token's bytes.

    First choice: the token's text (its bytes decoded as UTF-8) encoded by the teacher without
    special tokens, i.e. what the teacher makes of that piece of text. When that does not reproduce
    the bytes exactly (a byte-level token holding part of a multi-byte character, a Metaspace teacher
    that prefixes "▁", a normalizer that rewrites the text), the teacher's tokenization model is
    applied directly to the teacher's spelling of the bytes (`_spelled_pieces`). Ids without bytes
    (unmatched special tokens) or without an exact decomposition are left out."""
    student_bytes = token_bytes(student_tokenizer)
    teacher_bytes = token_bytes(teacher_tokenizer)
    ids = [i for i in student_ids if student_bytes[i]]
    # Bytes that are no valid UTF-8 decode to U+FFFD, which never spells them: `_spelled_pieces` takes those
    texts = [student_bytes[i].decode("utf-8", errors="replace") for i in ids]
    encoded = teacher_tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []

    def spells(pieces: list[int] | None, data: bytes) -> bool:
        return bool(pieces) and all(teacher_bytes[t] is not None for t in pieces) and \
            b"".join(teacher_bytes[t] for t in pieces) == data

    result: dict[int, list[int]] = {}
    for i, pieces in zip(ids, encoded):
        data = student_bytes[i]
        if not spells(pieces, data):
            pieces = _spelled_pieces(teacher_tokenizer, data)
        if spells(pieces, data):
            result[i] = list(pieces)
    return result


def _subword_mean_rows(target: Tensor, kinds: list[str], teacher_rows: Tensor, teacher_tokenizer, student_tokenizer,
                       student_ids: list[int]) -> dict[int, list[int]]:
    """Set `target[i]` to the mean teacher row of each decomposable student id (kind `subword_mean`);
    returns the decompositions."""
    decompositions = teacher_decomposition(teacher_tokenizer, student_tokenizer, student_ids)
    for i, pieces in decompositions.items():
        target[i] = teacher_rows[pieces].double().mean(dim=0).to(target.dtype)
        kinds[i] = "subword_mean"
    return decompositions


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------
def initialize_embeddings(
    source_embeddings: Tensor,
    teacher_tokenizer,
    student_tokenizer,
    method: InitMethod = "focus",
    *,
    texts: Iterable[str] | None = None,
    overlap: TokenOverlap | None = None,
    fasttext_model=None,
    fasttext_min_count: int = 1,
    fasttext_epochs: int = 3,
    fasttext_dim: int = 100,
    fasttext_threads: int = 1,
    cache_dir: str | Path | None = None,
    seed: int = 0,
    focus_fallback: str = "subword_mean",
) -> InitResult:
    """Embeddings for the student vocabulary from the teacher's `source_embeddings` (V_t, D).

    `texts` (target-language text) are required for `focus` unless a trained `fasttext_model`
    over the student's tokens is passed. `focus_fallback`: how FOCUS fills the new tokens fastText
    has no vector for (`subword_mean`, else N(mean, std) draws as `random`). Deterministic for a
    fixed `seed` (and `fasttext_threads=1`).
    """
    if method not in METHODS:
        raise ValueError(f"Unknown initialisation method {method!r}; choose one of {METHODS}")
    if focus_fallback not in FOCUS_FALLBACKS:
        raise ValueError(f"Unknown focus_fallback {focus_fallback!r}; choose one of {FOCUS_FALLBACKS}")
    if source_embeddings.ndim != 2:
        raise ValueError(f"source_embeddings must be (vocab, dim), got shape {tuple(source_embeddings.shape)}")
    num_teacher = len(teacher_tokenizer)
    if source_embeddings.shape[0] < num_teacher:
        raise ValueError(f"source_embeddings has {source_embeddings.shape[0]} rows but the teacher tokenizer "
                         f"has {num_teacher} tokens")
    overlap = overlap if overlap is not None else token_overlap(teacher_tokenizer, student_tokenizer)
    num_student = len(student_tokenizer)
    if overlap.student_vocab_size != num_student:
        raise ValueError(f"overlap was computed for {overlap.student_vocab_size} student tokens, but the student "
                         f"tokenizer has {num_student}")

    source = source_embeddings.detach().to("cpu", torch.float32)
    real_rows = source[:num_teacher]
    mean, std = real_rows.mean(dim=0), real_rows.std(dim=0)
    target = torch.zeros(num_student, source.shape[1], dtype=torch.float32)
    kinds = ["random"] * num_student

    for s_id, t_id in overlap.student_to_teacher.items():
        target[s_id] = source[t_id]
        kinds[s_id] = "copied"
    new_ids = [i for i in range(num_student) if kinds[i] != "copied"]

    decompositions: dict[int, list[int]] = {}
    if method == "mean":
        target[new_ids] = mean
        for i in new_ids:
            kinds[i] = "mean"
    elif method == "subword_mean":
        decompositions = _subword_mean_rows(target, kinds, real_rows, teacher_tokenizer, student_tokenizer, new_ids)
    elif method == "focus" and new_ids:
        if fasttext_model is None:
            if texts is None:
                raise ValueError("FOCUS initialisation needs target-language `texts` (or a `fasttext_model`)")
            fasttext_model = train_token_fasttext(texts, student_tokenizer, dim=fasttext_dim, epochs=fasttext_epochs,
                                                  min_count=fasttext_min_count, threads=fasttext_threads,
                                                  cache_dir=cache_dir)
        for i in _focus_rows(target, source, overlap, new_ids, teacher_tokenizer, student_tokenizer, fasttext_model):
            kinds[i] = "focus"
        left = [i for i in new_ids if kinds[i] == "random"]
        if left and focus_fallback == "subword_mean":
            decompositions = _subword_mean_rows(target, kinds, real_rows, teacher_tokenizer, student_tokenizer, left)
        if left:
            logger.info("FOCUS has no fastText vector for %d of %d new tokens: %d initialised by subword_mean, "
                        "%d drawn from N(mean, std)", len(left), len(new_ids), len(decompositions),
                        len(left) - len(decompositions))

    fallback = [i for i in new_ids if kinds[i] == "random"]
    if fallback:
        generator = torch.Generator().manual_seed(seed)
        target[fallback] = torch.normal(mean.expand(len(fallback), -1), std.expand(len(fallback), -1),
                                        generator=generator)
    result = InitResult(embeddings=target, overlap=overlap, kinds=kinds, decompositions=decompositions)
    logger.info("Initialised %d student embeddings with %s: %s", num_student, method, result.counts)
    return result


@dataclass
class InitReport:
    """What `build_student_model` did (for logs and experiment tracking)."""

    method: str
    teacher_vocab_size: int
    student_vocab_size: int
    embedding_rows: int
    overlap_ratio: float
    num_shared: int
    num_new: int
    counts: dict[str, int]
    tied: bool
    output_embeddings_initialized: bool
    """True when the untied LM head was initialised alongside the input embeddings."""
    overlap_summary: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_embedding_rows(model, tokenizer) -> None:
    """Raise `ValueError` when some token id of `tokenizer` has no embedding row in `model`."""
    for what, module in (("embedding rows", model.get_input_embeddings()),
                         ("output embedding (LM head) rows", model.get_output_embeddings())):
        if module is not None and module.weight.shape[0] < len(tokenizer):
            raise ValueError(f"model has {module.weight.shape[0]} {what} but tokenizer has {len(tokenizer)} tokens")


def embeddings_tied(model) -> bool:
    """The HF model's LM head shares the input embedding matrix."""
    output = model.get_output_embeddings()
    return output is not None and output.weight is model.get_input_embeddings().weight


def set_special_token_ids(model, tokenizer) -> None:
    """Point the model's (its text config's and its generation config's) pad/bos/eos ids at the tokenizer's."""
    ids = {f"{role}_token_id": getattr(tokenizer, f"{role}_token_id", None) for role in ("pad", "bos", "eos")}
    configs = [model.config, model.config.get_text_config(), getattr(model, "generation_config", None)]
    for config in {id(c): c for c in configs if c is not None}.values():
        for key, value in ids.items():
            setattr(config, key, value)


def build_student_model(
    teacher_model,
    teacher_tokenizer,
    student_tokenizer,
    method: InitMethod = "focus",
    *,
    texts: Iterable[str] | None = None,
    overlap: TokenOverlap | None = None,
    **init_kwargs: Any,
):
    """A new model (deep copy of the teacher; the teacher is untouched) for the student vocabulary.

    Input embeddings get `len(student_tokenizer)` rows initialised by `initialize_embeddings`; the
    embedding module keeps its class (e.g. Gemma's scaled embedding). An untied LM head is
    initialised the same way from the teacher's head: both matrices are initialised as one (V_t, 2D)
    matrix, so a new token gets the same FOCUS weights (or the same mean/draw) on both sides. Tied
    models stay tied. Config and generation config get the student's vocab size and pad/bos/eos ids.
    Returns `(student_model, InitReport)`.
    """
    check_embedding_rows(teacher_model, teacher_tokenizer)
    tied = embeddings_tied(teacher_model)
    output = teacher_model.get_output_embeddings()
    if output is not None and not tied and getattr(output, "bias", None) is not None:
        raise ValueError("LM heads with a bias are not supported by build_student_model")
    source = teacher_model.get_input_embeddings().weight.detach().float().cpu()
    dim = source.shape[1]
    if output is not None and not tied:
        source = torch.cat([source, output.weight.detach().float().cpu()], dim=1)

    result = initialize_embeddings(source, teacher_tokenizer, student_tokenizer, method, texts=texts,
                                   overlap=overlap, **init_kwargs)

    student = copy.deepcopy(teacher_model)
    num_student = len(student_tokenizer)
    student.resize_token_embeddings(num_student, mean_resizing=False)
    input_embeddings = student.get_input_embeddings()
    with torch.no_grad():
        weight = input_embeddings.weight
        weight.copy_(result.embeddings[:, :dim].to(weight.device, weight.dtype))
        if output is not None and not tied:
            head = student.get_output_embeddings().weight
            head.copy_(result.embeddings[:, dim:].to(head.device, head.dtype))
    set_special_token_ids(student, student_tokenizer)
    check_embedding_rows(student, student_tokenizer)

    overlap = result.overlap
    report = InitReport(
        method=method,
        teacher_vocab_size=len(teacher_tokenizer),
        student_vocab_size=num_student,
        embedding_rows=input_embeddings.weight.shape[0],
        overlap_ratio=overlap.ratio,
        num_shared=overlap.num_shared,
        num_new=overlap.num_new,
        counts=result.counts,
        tied=tied,
        output_embeddings_initialized=output is not None and not tied,
        overlap_summary=overlap.summary(),
    )
    logger.info("Student model: %d embedding rows, %.1f%% of the student vocabulary shared with the teacher, %s",
                report.embedding_rows, 100 * overlap.ratio, report.counts)
    return student, report
