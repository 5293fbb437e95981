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
from matt.evaluation.scoring import prefix_token_id, require_fast_tokenizer, score_sequences

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


def build_choice_items(
    texts: Iterable[str],
    *,
    num_items: int,
    num_choices: int = 4,
    seed: int = 0,
    context_sentences: int = 3,
    min_sentence_chars: int = 20,
    max_sentence_chars: int = 400,
) -> list[ChoiceItem]:
    """Deterministic (given `seed`) next-sentence questions from held-out documents.

    Sentences shorter than `min_sentence_chars` (headings, list markers) or longer than
    `max_sentence_chars` are dropped, and the count is logged. Each question uses up to
    `context_sentences` consecutive sentences as context, the following sentence as the answer
    and `num_choices - 1` distinct sentences drawn from other documents as distractors. Fewer than
    `num_items` questions are returned (with a warning) when the documents do not offer enough.
    """
    if num_items < 1 or num_choices < 2 or context_sentences < 1:
        raise ValueError(
            f"Need num_items >= 1, num_choices >= 2, context_sentences >= 1; got {num_items}, "
            f"{num_choices}, {context_sentences}"
        )
    documents = []
    dropped = total = 0
    for text in as_text_list(texts):
        sentences = split_sentences(text)
        total += len(sentences)
        kept = [s for s in sentences if min_sentence_chars <= len(s) <= max_sentence_chars]
        dropped += len(sentences) - len(kept)
        documents.append(kept)
    if dropped:
        logger.info("Dropped %d of %d sentences outside [%d, %d] characters", dropped, total,
                    min_sentence_chars, max_sentence_chars)

    pool = [(doc, sentence) for doc, sentences in enumerate(documents) for sentence in sentences]
    candidates = [(doc, i) for doc, sentences in enumerate(documents) for i in range(1, len(sentences))]
    if sum(1 for sentences in documents if sentences) < 2:
        raise ValueError("Multiple-choice items need sentences from at least two documents (distractors come "
                         "from other documents)")
    rng = random.Random(seed)
    chosen = rng.sample(candidates, min(num_items, len(candidates)))
    items = []
    for doc, i in chosen:
        answer = documents[doc][i]
        others = [sentence for other, sentence in pool if other != doc and sentence != answer]
        distractors = _distinct_sample(rng, others, num_choices - 1)
        if distractors is None:
            raise ValueError(f"Not enough distinct sentences in other documents for {num_choices} choices")
        label = rng.randrange(num_choices)
        choices = distractors[:label] + [answer] + distractors[label:]
        context = " ".join(documents[doc][max(0, i - context_sentences) : i])
        items.append(ChoiceItem(context=context, choices=tuple(choices), label=label))
    if len(items) < num_items:
        logger.warning("Built only %d of %d requested multiple-choice items", len(items), num_items)
    return items


def _distinct_sample(rng: random.Random, population: list[str], k: int) -> list[str] | None:
    """k distinct strings from `population` (which may repeat sentences), or None if impossible."""
    distinct = sorted(set(population))
    if len(distinct) < k:
        return None
    return rng.sample(distinct, k)


def continuation_tokens(tokenizer, context: str, continuation: str) -> tuple[list[int], int, str]:
    """Tokenize `context + continuation` once, as the model would see it, and find the split.

    Returns `(ids, num_context_ids, scored_text)`. If the context's own tokens are a prefix of the
    joint tokenization (the normal case: the continuation starts with a space), exactly the
    continuation is scored. If a token straddles the boundary, it belongs to the scored part and
    `scored_text` grows back to that token's first character, so scored bytes always match the
    scored tokens.
    """
    whole = context + continuation
    encoding = tokenizer(whole, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoding["input_ids"])
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"] if context else []
    if ids[: len(context_ids)] == context_ids:
        split_ids, split_char = len(context_ids), len(context)
    else:
        split_ids = 0
        while split_ids < len(context_ids) and ids[split_ids] == context_ids[split_ids]:
            split_ids += 1
        split_char = min(len(context), encoding["offset_mapping"][split_ids][0])
        logger.debug("Context/continuation boundary inside a token; scoring from char %d", split_char)
    if split_ids >= len(ids):
        raise ValueError(f"Continuation {continuation!r} produced no tokens after context")
    return ids, split_ids, whole[split_char:]


def multiple_choice_accuracy(
    model: torch.nn.Module,
    tokenizer,
    items: Sequence[ChoiceItem],
    *,
    delimiter: str = " ",
    max_length: int = 1024,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Share of items whose true choice has the highest log-likelihood per UTF-8 byte.

    Each choice is scored as `delimiter + choice` after the context (the delimiter belongs to the
    continuation, so the context tokens are identical for all choices). Inputs are
    `[prefix token] + context + continuation`; contexts longer than `max_length` allows are cut
    from the left. Ties go to the first choice.
    """
    require_fast_tokenizer(tokenizer)
    if not items:
        raise ValueError("No multiple-choice items to evaluate")
    prefix_id = prefix_token_id(tokenizer)
    sequences, num_context, num_bytes = [], [], []
    for item in items:
        if not 0 <= item.label < len(item.choices):
            raise ValueError(f"Item label {item.label} is out of range for {len(item.choices)} choices")
        for choice in item.choices:
            ids, n_ctx, scored = continuation_tokens(tokenizer, item.context, delimiter + choice)
            context_ids, scored_ids = ids[:n_ctx], ids[n_ctx:]
            room = max_length - 1 - len(scored_ids)
            if room < 0:
                raise ValueError(f"A choice has {len(scored_ids)} tokens, more than max_length={max_length} allows")
            context_ids = context_ids[len(context_ids) - room :] if room < len(context_ids) else context_ids
            sequences.append([prefix_id, *context_ids, *scored_ids])
            num_context.append(1 + len(context_ids))
            num_bytes.append(len(scored.encode("utf-8")))
    nll = score_sequences(model, sequences, num_context, batch_size=batch_size, device=device,
                          progress=progress, desc="choice")
    correct = 0
    position = 0
    for item in items:
        scores = [-nll[position + j] / num_bytes[position + j] for j in range(len(item.choices))]
        position += len(item.choices)
        correct += int(max(range(len(scores)), key=scores.__getitem__) == item.label)
    return {"accuracy": correct / len(items), "n": len(items)}


def chance_accuracy(items: Sequence[ChoiceItem]) -> float:
    """Expected accuracy of random guessing (the baseline to read `accuracy` against)."""
    return math.fsum(1 / len(item.choices) for item in items) / len(items)
