"""A model that cannot read scores chance on the multiple-choice items (statistical tests, fixed seeds).

The corpus mimics what made the man-page items biased: running prose (long sentences, the
answerable ones) interleaved with option blocks (a dropped "-x" marker line, then a short
description that is kept but never answerable). Distractors drawn from all kept sentences were
mostly short descriptions, so "pick the longest choice" beat chance and a random model's
per-byte likelihood sat away from it; with distractors from the answerable pool, matched in
length, neither can tell the answer.
"""

from __future__ import annotations

import random

import pytest

from matt.evaluation import build_choice_items, multiple_choice_accuracy
from matt.evaluation.intervals import wilson_interval
from matt.tiny import tiny_model, train_tokenizer

WORDS = ("system file user mount option value device service memory process kernel network time path name "
         "format output input default command signal").split()


def prose_sentence(rng: random.Random, low: int, high: int) -> str:
    words = [rng.choice(WORDS)]
    while len(" ".join(words)) < rng.randint(low, high):
        words.append(rng.choice(WORDS))
    return " ".join(words).capitalize() + "."


def biased_corpus(num_docs: int = 24, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    documents = []
    for _ in range(num_docs):
        lines = []
        for _ in range(6):
            lines.append(" ".join(prose_sentence(rng, 80, 300) for _ in range(rng.randint(3, 6))))
            for _ in range(rng.randint(2, 4)):
                lines.append(f"-{rng.choice('abcdefgh')}")  # dropped: shorter than 20 characters
                lines.append(prose_sentence(rng, 20, 45))   # kept, never answerable
        documents.append("\n".join(lines))
    return documents


def assert_chance(credits: list[float], chance: float = 0.25) -> None:
    low, high = wilson_interval(sum(credits), len(credits))
    assert low <= chance <= high, f"accuracy {sum(credits) / len(credits):.3f} [{low:.3f}, {high:.3f}] is not chance"


def test_length_does_not_reveal_the_answer():
    items = build_choice_items(biased_corpus(), num_items=600, seed=0)
    assert len(items) == 600
    longest = [float(max(range(4), key=lambda j: len(item.choices[j])) == item.label) for item in items]
    shortest = [float(min(range(4), key=lambda j: len(item.choices[j])) == item.label) for item in items]
    assert_chance(longest)
    assert_chance(shortest)
    for item in items:  # distractors are the nearest answerable lengths: within 2x of the answer
        sizes = [len(choice.encode()) for choice in item.choices]
        assert max(sizes) <= 2 * min(sizes)


@pytest.fixture(scope="module")
def corpus_and_tokenizer():
    corpus = biased_corpus()
    return corpus, train_tokenizer(corpus, vocab_size=300)


def test_random_model_scores_chance_per_byte_and_by_pmi(corpus_and_tokenizer):
    corpus, tokenizer = corpus_and_tokenizer
    items = build_choice_items(corpus, num_items=400, seed=1, context_sentences=2)
    model = tiny_model("llama", len(tokenizer), seed=3)  # every weight random, embeddings included
    result = multiple_choice_accuracy(model, tokenizer, items, batch_size=16, progress=False, pmi=True)
    assert result["n"] == 400
    assert_chance(result["credits"])
    assert_chance(result["credits_pmi"])
    assert result["accuracy_ci_low"] <= 0.25 <= result["accuracy_ci_high"]
