"""Discriminative proxy: pick the true next sentence of a held-out document among distractors.

No labelled benchmark is needed: the context is a few sentences of a held-out document, the right
answer is the sentence that follows, and the distractors are sentences of *other* documents. A
model that still understands the language prefers the coherent continuation. Choices are ranked by
log-likelihood per UTF-8 byte of the continuation, which (unlike per-token scores) does not depend
on how finely a tokenizer cuts the choices, so the number is comparable across tokenizers.
"""

from __future__ import annotations

import logging
import math
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from matt.evaluation.bpb import as_text_list
from matt.evaluation.intervals import wilson_interval
from matt.evaluation.scoring import check_max_length, prefix_token_id, require_fast_tokenizer, score_continuations

logger = logging.getLogger(__name__)

# A sentence runs lazily to terminal punctuation (plus closing quotes/brackets) that is followed by
# whitespace or the end of the line; "3.14" or "example.org" do not end a sentence.
_SENTENCE = re.compile(r"\S.*?(?:[.!?…]+[\"'”’»)\]]*(?=\s|$)|$)")


@dataclass(frozen=True)
class ChoiceItem:
    """One multiple-choice question: `choices[label]` is the true continuation of `context`."""

    context: str
    choices: tuple[str, ...]
    label: int


def split_sentences(text: str) -> list[str]:
    """Sentences of `text` in order; every line (paragraph) break also ends a sentence."""
    sentences = []
    for line in text.splitlines():
        sentences.extend(match.group(0).strip() for match in _SENTENCE.finditer(line))
    return [sentence for sentence in sentences if sentence]


def build_choice_items(texts: Iterable[str], *, num_items: int, num_choices: int = 4, seed: int = 0,
                       context_sentences: int = 3, min_sentence_chars: int = 20,
                       max_sentence_chars: int = 400) -> list[ChoiceItem]:
    """Deterministic (given `seed`) next-sentence questions from held-out documents.

    Sentences shorter than `min_sentence_chars` (headings, list markers) or longer than
    `max_sentence_chars` are not used, and the count is logged. An *answerable* sentence is a kept
    sentence whose predecessor in the document was also kept. Each question takes an answerable
    sentence as the answer, up to `context_sentences` directly preceding kept sentences as context
    (a dropped sentence ends the context, so context and answer are always adjacent in the original
    text) and `num_choices - 1` distinct answerable sentences of *other* documents, different from
    the answer, as distractors (other kept sentences only when a small text has too few).

    Distractors are drawn from the same population as answers and matched in length: among the
    other documents' answerable sentences (in a seeded random order) the ones whose UTF-8 length is
    closest to the answer's (by |log ratio|) are taken, so a choice's surface (length, kind of
    sentence) says nothing about the label; only the context does. (Unmatched distractors were
    shorter than answers, and length-sensitive scores sat away from chance: README, "Evaluation".)

    The answer positions are balanced (each position is the label for `num_items / num_choices`
    items, rounded) and shuffled, so a model biased to one position scores chance. Fewer than
    `num_items` questions are returned (with a warning) when the documents do not offer enough.
    """
    if num_items < 1 or num_choices < 2 or context_sentences < 1:
        raise ValueError(f"Need num_items >= 1, num_choices >= 2, context_sentences >= 1; got {num_items}, "
                         f"{num_choices}, {context_sentences}")
    # Per document: (position in the document's sentence list, sentence) of the kept sentences.
    documents: list[list[tuple[int, str]]] = []
    dropped = total = 0
    for text in as_text_list(texts):
        sentences = split_sentences(text)
        total += len(sentences)
        kept = [(i, s) for i, s in enumerate(sentences) if min_sentence_chars <= len(s) <= max_sentence_chars]
        dropped += len(sentences) - len(kept)
        documents.append(kept)
    if dropped:
        logger.info("Dropped %d of %d sentences outside [%d, %d] characters", dropped, total,
                    min_sentence_chars, max_sentence_chars)
    if sum(1 for kept in documents if kept) < 2:
        raise ValueError("Multiple-choice items need sentences from at least two documents (distractors come "
                         "from other documents)")

    candidates = [
        (doc, j)
        for doc, kept in enumerate(documents)
        for j in range(1, len(kept))
        if kept[j - 1][0] == kept[j][0] - 1
    ]
    rng = random.Random(seed)
    chosen = rng.sample(candidates, min(num_items, len(candidates)))
    labels = [k % num_choices for k in range(len(chosen))]
    rng.shuffle(labels)
    # Distractor pool of (tier, document, sentence) in a seeded order (which breaks ties between
    # equally long sentences at random): answerable sentences are tier 0; the other kept sentences
    # (tier 1) are used only when a small text runs out of answerable ones.
    answerable = {(doc, documents[doc][j][1]) for doc, j in candidates}
    others = {(doc, sentence) for doc, kept in enumerate(documents) for _, sentence in kept} - answerable
    pool = [(0, *entry) for entry in sorted(answerable)] + [(1, *entry) for entry in sorted(others)]
    rng.shuffle(pool)
    pool_sizes = [math.log(len(sentence.encode("utf-8"))) for _, _, sentence in pool]
    items = []
    for (doc, j), label in zip(chosen, labels):
        kept = documents[doc]
        answer = kept[j][1]
        first = j - 1
        while first > 0 and j - first < context_sentences and kept[first - 1][0] == kept[first][0] - 1:
            first -= 1
        size = math.log(len(answer.encode("utf-8")))
        ranked = sorted((tier, abs(pool_sizes[k] - size), k) for k, (tier, other, sentence) in enumerate(pool)
                        if other != doc and sentence != answer)
        distractors: list[str] = []
        for _, _, k in ranked:
            if pool[k][2] not in distractors:
                distractors.append(pool[k][2])
            if len(distractors) == num_choices - 1:
                break
        if len(distractors) < num_choices - 1:
            raise ValueError(f"Not enough distinct sentences in other documents for {num_choices} choices")
        rng.shuffle(distractors)
        choices = distractors[:label] + [answer] + distractors[label:]
        context = " ".join(sentence for _, sentence in kept[first:j])
        items.append(ChoiceItem(context=context, choices=tuple(choices), label=label))
    if len(items) < num_items:
        logger.warning("Built only %d of %d requested multiple-choice items (%d answerable sentences)",
                       len(items), num_items, len(candidates))
    return items


def continuation_tokens(tokenizer, context: str, continuation: str) -> tuple[list[int], int, str]:
    """Tokenize `context + continuation` once, as the model would see it, and find the split.

    Returns `(ids, num_context_ids, scored_text)`: `ids[num_context_ids:]` are scored and encode
    exactly `scored_text`, a suffix of `context + continuation`, so the scored bytes always match
    the scored tokens. If the context's own tokens are a prefix of the joint tokenization (the
    normal case: the continuation starts with a space), `scored_text` is the continuation. If a
    token straddles the boundary (e.g. a word cut in two, or bytes of one character merged across
    it), the split moves back to the start of that token, and further back while the token shares
    a character with its predecessor (byte-level pieces of one multi-byte character), so the
    scored part starts at a character boundary and grows by the context characters it re-encodes.
    """
    whole = context + continuation
    encoding = tokenizer(whole, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoding["input_ids"])
    offsets = encoding["offset_mapping"]
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"] if context else []
    split_ids = 0
    while split_ids < min(len(context_ids), len(ids)) and ids[split_ids] == context_ids[split_ids]:
        split_ids += 1
    if split_ids == len(context_ids):
        split_char = len(context)
    else:
        while split_ids > 0 and offsets[split_ids][0] < offsets[split_ids - 1][1]:
            split_ids -= 1
        # The previous token's end, not this token's start: offsets that trim a leading space
        # (some tokenizers do) would otherwise drop the space the token encodes.
        split_char = offsets[split_ids - 1][1] if split_ids > 0 else 0
        logger.debug("Context/continuation boundary inside a token; scoring from char %d", split_char)
    if split_ids >= len(ids):
        raise ValueError(f"Continuation {continuation!r} produced no tokens after context")
    return ids, split_ids, whole[split_char:]


def multiple_choice_accuracy(model: torch.nn.Module, tokenizer, items: Sequence[ChoiceItem], *, delimiter: str = " ",
                             max_length: int = 1024, batch_size: int = 16, device: torch.device | str | None = None,
                             progress: bool = True, pmi: bool = False, confidence: float = 0.95) -> dict:
    """Share of items whose true choice has the highest log-likelihood per UTF-8 byte.

    Each choice is scored as `delimiter + choice` after `[prefix token] + context` (the delimiter
    belongs to the continuation, so the choices share the context tokens and one forward pass of
    them, `score_continuations`, unless a token straddles the boundary); contexts longer than
    `max_length` allows are cut from the left.

    With `pmi=True` also `accuracy_pmi` (and `ties_pmi`): choices ranked by
    log p(choice | context) − log p(choice | no context) (lm-eval's `acc_mutual_info`). Per-byte
    scores still favour choices that are likely anyway (short, formulaic sentences), so a model that
    ignores the context can land away from chance; under PMI it scores exactly chance. It costs one
    more, short, pass over the choices.

    Ties are split: a true choice sharing the best score with k - 1 others counts 1/k (the expected
    accuracy of a random tie-break), so a model that cannot tell the choices apart scores exactly
    chance. Returns `accuracy`, `accuracy_ci_low` / `accuracy_ci_high` (Wilson interval at
    `confidence`), `n` (items), `ties` (items with a tied best score), `chance` and `credits` (per
    item, for paired comparisons on the same items); with PMI the same with `_pmi`.
    """
    require_fast_tokenizer(tokenizer)
    if not items:
        raise ValueError("No multiple-choice items to evaluate")
    check_max_length(model, max_length)
    prefix_id = prefix_token_id(tokenizer)
    # Per item: its distinct context token lists, each with the choices (scored ids) that follow it.
    contexts: list[list[int]] = []
    continuations: list[list[list[int]]] = []
    where: list[tuple[int, int]] = []  # per choice (in item order): (context group, position in the group)
    num_bytes: list[int] = []
    alone: list[list[int]] = []
    for item in items:
        if not 0 <= item.label < len(item.choices):
            raise ValueError(f"Item label {item.label} is out of range for {len(item.choices)} choices")
        groups: dict[tuple[int, ...], int] = {}
        alone.append([])
        for choice in item.choices:
            ids, n_ctx, scored = continuation_tokens(tokenizer, item.context, delimiter + choice)
            scored_ids = ids[n_ctx:]
            room = max_length - 1 - len(scored_ids)
            if room < 0:
                raise ValueError(f"A choice has {len(scored_ids)} tokens, more than max_length={max_length} allows")
            key = (prefix_id, *ids[max(0, n_ctx - room) : n_ctx])
            if key not in groups:
                groups[key] = len(contexts)
                contexts.append(list(key))
                continuations.append([])
            group = groups[key]
            where.append((group, len(continuations[group])))
            continuations[group].append(scored_ids)
            num_bytes.append(len(scored.encode("utf-8")))
            if pmi:
                alone[-1].append(tokenizer(scored, add_special_tokens=False)["input_ids"][: max_length - 1])
    parts = score_continuations(model, contexts, continuations, batch_size=batch_size, device=device,
                                progress=progress, desc="choice")
    nll = [float(parts[group][position].double().sum()) for group, position in where]
    result: dict = {"n": len(items), "chance": chance_accuracy(items)}
    result.update(_summary(items, [-value / size for value, size in zip(nll, num_bytes)], "", confidence))
    if pmi:
        parts_alone = score_continuations(model, [[prefix_id]] * len(items), alone, batch_size=batch_size,
                                          device=device, progress=progress, desc="choice (no context)")
        nll_alone = [float(part.double().sum()) for item_parts in parts_alone for part in item_parts]
        result.update(_summary(items, [without - with_context for with_context, without in zip(nll, nll_alone)],
                               "_pmi", confidence))
    return result


def _summary(items: Sequence[ChoiceItem], scores: list[float], suffix: str, confidence: float) -> dict:
    """Accuracy from per-item credits: 1 if the true choice scores best, 1/k if it shares the best
    score with k - 1 others, else 0 (see `multiple_choice_accuracy`)."""
    credits = []
    ties = 0
    position = 0
    for item in items:
        item_scores = scores[position:position + len(item.choices)]
        position += len(item.choices)
        best = max(item_scores)
        tied = [j for j, score in enumerate(item_scores) if score == best]
        ties += len(tied) > 1
        credits.append(1 / len(tied) if item.label in tied else 0.0)
    if ties:
        logger.info("%d of %d multiple-choice items had tied best choices (split credit)", ties, len(items))
    low, high = wilson_interval(math.fsum(credits), len(credits), confidence)
    return {f"accuracy{suffix}": math.fsum(credits) / len(credits), f"accuracy{suffix}_ci_low": low,
            f"accuracy{suffix}_ci_high": high, f"ties{suffix}": ties, f"credits{suffix}": credits}


def chance_accuracy(items: Sequence[ChoiceItem]) -> float:
    """Expected accuracy of random guessing (the baseline to read `accuracy` against)."""
    return math.fsum(1 / len(item.choices) for item in items) / len(items)
