"""Multiple-choice proxy: item construction, tie rule, per-byte normalisation, byte accounting."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from evaluation_helpers import (ConstantLM, OracleLM, TwoTokenLM, byte_alphabet, hand_bpe_tokenizer,
                                token_bytes)

from matt.evaluation import ChoiceItem, build_choice_items, chance_accuracy, multiple_choice_accuracy
from matt.evaluation.choice import continuation_tokens, split_sentences
from matt.evaluation.scoring import prefix_token_id


def make_documents(num_docs: int = 6, sentences_per_doc: int = 6) -> list[str]:
    """Documents whose sentences are unique and tell their document and position."""
    return [
        " ".join(f"Document {d} says sentence number {s} here." for s in range(sentences_per_doc))
        for d in range(num_docs)
    ]


def doc_and_position(sentence: str) -> tuple[int, int]:
    words = sentence.split()
    return int(words[1]), int(words[5])


def test_split_sentences():
    text = "Pi is 3.14 today. See example.org for more!  Really?\nA new line\n\nends one too. «Quoted.» End"
    assert split_sentences(text) == [
        "Pi is 3.14 today.", "See example.org for more!", "Really?", "A new line", "ends one too.",
        "«Quoted.»", "End",
    ]


def test_items_are_deterministic_per_seed():
    docs = make_documents()
    first = build_choice_items(docs, num_items=12, seed=3)
    assert first == build_choice_items(docs, num_items=12, seed=3)
    assert first != build_choice_items(docs, num_items=12, seed=4)


def test_answer_follows_its_context_and_distractors_come_from_other_documents():
    items = build_choice_items(make_documents(), num_items=20, context_sentences=2, seed=0)
    assert len(items) == 20
    for item in items:
        answer = item.choices[item.label]
        doc, position = doc_and_position(answer)
        context = split_sentences(item.context)
        assert [doc_and_position(s) for s in context] == [(doc, p) for p in range(max(0, position - 2), position)]
        assert len(set(item.choices)) == len(item.choices) == 4
        for j, choice in enumerate(item.choices):
            if j != item.label:
                assert doc_and_position(choice)[0] != doc


def test_label_positions_are_balanced_and_shuffled():
    items = build_choice_items(make_documents(8, 8), num_items=40, seed=0)
    labels = [item.label for item in items]
    assert Counter(labels) == {0: 10, 1: 10, 2: 10, 3: 10}
    assert labels != sorted(labels) and labels != [k % 4 for k in range(40)]
    assert chance_accuracy(items) == 0.25
    odd = build_choice_items(make_documents(8, 8), num_items=7, num_choices=3, seed=1)
    assert sorted(Counter(item.label for item in odd).values()) == [2, 2, 3]


def test_dropped_sentences_break_the_context():
    # "Short." is dropped (< 20 chars), so "Sentence C ..." cannot be asked after "Sentence A ...".
    docs = [
        "Sentence A is long enough to keep. Short. Sentence C is long enough to keep. Sentence D is long enough too.",
        "Another document gives distractor one. Another document gives distractor two. And a third one for luck.",
    ]
    items = build_choice_items(docs, num_items=50, num_choices=3, seed=0)
    pairs = {(item.context, item.choices[item.label]) for item in items}
    assert ("Sentence C is long enough to keep.", "Sentence D is long enough too.") in pairs
    assert not any(answer.startswith("Sentence C") for _, answer in pairs)
    assert len(items) == 3  # only adjacent pairs: (C, D) and two in the second document


def test_item_construction_errors():
    with pytest.raises(ValueError, match="at least two documents"):
        build_choice_items(make_documents(1), num_items=3)
    with pytest.raises(ValueError, match="num_choices >= 2"):
        build_choice_items(make_documents(), num_items=3, num_choices=1)
    with pytest.raises(ValueError, match="Not enough distinct sentences"):
        build_choice_items(make_documents(2, 3), num_items=1, num_choices=5)


# --- accuracy --------------------------------------------------------------------------------


@pytest.mark.parametrize("tokenizer_name", ["byte_level_tokenizer", "sentencepiece_tokenizer"])
def test_model_that_knows_the_true_continuation_scores_one(tokenizer_name, request, sample_texts):
    tok = request.getfixturevalue(tokenizer_name)
    items = build_choice_items(sample_texts + make_documents(3), num_items=8, min_sentence_chars=5, seed=0)
    assert len(items) == 8
    prefix = prefix_token_id(tok)
    truths = [[prefix, *tok(item.context + " " + item.choices[item.label], add_special_tokens=False)["input_ids"]]
              for item in items]
    model = OracleLM(len(tok), truths)
    result = multiple_choice_accuracy(model, tok, items, batch_size=3, progress=False)
    z2 = 1.959963984540054 ** 2
    assert result == {"accuracy": 1.0, "n": 8, "ties": 0, "chance": 0.25, "credits": [1.0] * 8,
                      "accuracy_ci_low": pytest.approx(8 / (8 + z2)), "accuracy_ci_high": 1.0}  # Wilson at p = 1
    # The same model with the labels moved to a wrong choice scores 0: it is not position luck.
    wrong = [ChoiceItem(item.context, item.choices, (item.label + 1) % 4) for item in items]
    assert multiple_choice_accuracy(model, tok, wrong, progress=False)["accuracy"] == 0.0


def char_tokenizer():
    return hand_bpe_tokenizer(list("abcdxyz .ї"))


def test_ties_are_split_and_do_not_favour_the_label():
    tok = char_tokenizer()
    uniform = ConstantLM(torch.zeros(len(tok)))
    # Every choice is one character: same tokens, same bytes, so a uniform model ties all four.
    items = [ChoiceItem("xyz", ("a", "b", "c", "d"), 0) for _ in range(5)]
    result = multiple_choice_accuracy(uniform, tok, items, progress=False)
    assert {k: result[k] for k in ("accuracy", "n", "ties", "chance", "credits")} == {
        "accuracy": 0.25, "n": 5, "ties": 5, "chance": 0.25, "credits": [0.25] * 5}
    # Two-way tie with the label in it: half credit; tie without the label: none.
    prefers_ab = torch.zeros(len(tok))
    prefers_ab[tok.convert_tokens_to_ids(["a", "b"])] = 2.0
    model = ConstantLM(prefers_ab)
    items = [ChoiceItem("xyz", ("a", "b", "c", "d"), 1), ChoiceItem("xyz", ("a", "b", "c", "d"), 2)]
    assert multiple_choice_accuracy(model, tok, items, progress=False)["accuracy"] == pytest.approx(0.25)


def test_pmi_scores_what_the_context_adds():
    """A model that likes "a" anyway but likes "b" more after "z": per byte it picks "a" whatever the
    context says; PMI (log p(c | context) - log p(c | nothing)) picks "b", the choice the context raised."""
    tok = char_tokenizer()
    ids = {c: tok.convert_tokens_to_ids(c) for c in "abz "}
    a = torch.zeros(len(tok), len(tok))
    a[ids[" "], ids["a"]], a[ids[" "], ids["b"]] = 5.0, 1.0  # after a space: "a" is the likely letter
    b = torch.zeros(len(tok), len(tok))
    b[ids["z"], ids["b"]] = 2.0  # ... but a "z" two tokens back makes "b" likelier than usual
    model = TwoTokenLM(a, b)
    item = ChoiceItem("xyz", ("a", "b", "c", "d"), 1)
    result = multiple_choice_accuracy(model, tok, [item], progress=False, pmi=True)
    assert result["accuracy"] == 0.0 and result["accuracy_pmi"] == 1.0


@pytest.mark.parametrize("tokenizer_name", ["byte_level_tokenizer", "sentencepiece_tokenizer"])
def test_pmi_of_context_blind_and_context_aware_models(tokenizer_name, request, sample_texts):
    tok = request.getfixturevalue(tokenizer_name)
    items = build_choice_items(sample_texts + make_documents(3), num_items=8, min_sentence_chars=5, seed=0)
    biased = torch.randn(len(tok), generator=torch.Generator().manual_seed(0)) * 3
    blind = multiple_choice_accuracy(ConstantLM(biased), tok, items, progress=False, pmi=True)
    assert blind["accuracy_pmi"] == pytest.approx(0.25) and blind["ties_pmi"] == len(items)  # context adds nothing
    prefix = prefix_token_id(tok)
    truths = [[prefix, *tok(item.context + " " + item.choices[item.label], add_special_tokens=False)["input_ids"]]
              for item in items]
    oracle = multiple_choice_accuracy(OracleLM(len(tok), truths), tok, items, progress=False, pmi=True)
    assert oracle["accuracy_pmi"] == 1.0 and oracle["accuracy"] == 1.0


def test_longer_choice_is_not_penalised_for_its_length():
    tok = char_tokenizer()  # one token per character
    logits = torch.full((len(tok),), -30.0)
    probs = {"a": 0.4, "b": 0.1, "c": 0.1, "d": 0.1, " ": 0.1, "x": 0.1, "y": 0.05, "z": 0.05}
    for char, p in probs.items():
        logits[tok.convert_tokens_to_ids(char)] = math.log(p)
    model = ConstantLM(logits)
    long, shorts = "a" * 10, ("bb", "cc", "dd")
    item = ChoiceItem("xyz", (shorts[0], long, *shorts[1:]), 1)
    # Total log-likelihood prefers a short choice; per byte the long one is better.
    total = {c: model.log_prob(tok.convert_tokens_to_ids(" ")) + sum(model.log_prob(tok.convert_tokens_to_ids(x))
                                                                    for x in c) for c in item.choices}
    assert max(total, key=total.get) != long
    assert max(item.choices, key=lambda c: total[c] / (len(c) + 1)) == long
    assert multiple_choice_accuracy(model, tok, [item], progress=False)["accuracy"] == 1.0


def test_per_byte_counts_utf8_bytes_not_characters():
    tok = char_tokenizer()
    logits = torch.full((len(tok),), -30.0)
    for char, p in {"ї": 0.2, "a": 0.3, " ": 0.5}.items():
        logits[tok.convert_tokens_to_ids(char)] = math.log(p)
    model = ConstantLM(logits)
    # Per character "a" (p=0.3) beats "ї" (p=0.2); per UTF-8 byte "ї" (2 bytes) wins.
    item = ChoiceItem("xyz", ("ї" * 4, "a" * 4), 0)
    per_char = [(math.log(0.5) + 4 * math.log(p)) / 5 for p in (0.2, 0.3)]
    per_byte = [(math.log(0.5) + 4 * math.log(p)) / n for p, n in ((0.2, 9), (0.3, 5))]
    assert per_char[1] > per_char[0] and per_byte[0] > per_byte[1]
    assert multiple_choice_accuracy(model, tok, [item], progress=False)["accuracy"] == 1.0


def test_accuracy_input_errors(byte_level_tokenizer):
    model = ConstantLM(torch.zeros(len(byte_level_tokenizer)))
    with pytest.raises(ValueError, match="No multiple-choice items"):
        multiple_choice_accuracy(model, byte_level_tokenizer, [], progress=False)
    with pytest.raises(ValueError, match="label 4 is out of range"):
        multiple_choice_accuracy(model, byte_level_tokenizer, [ChoiceItem("a", ("b", "c"), 4)], progress=False)


# --- byte accounting at the context/continuation boundary ------------------------------------

BOUNDARY_CASES = [
    ("The quick brown fox", " jumps over"),  # clean: continuation starts with a space
    ("The qui", "ck brown fox"),  # cut inside a word
    ("Привіт, сві", "те!"),  # inside a Cyrillic word
    ("Zażółć gęś", "lą jaźń"),
    ("spaces   ", "  matter."),  # whitespace runs merged across the boundary
    ("emoji 🙂", "🙂 too"),
    ("", "Only a continuation"),
]


def check_byte_accounting(tok, style, context, continuation):
    ids, n_ctx, scored = continuation_tokens(tok, context, continuation)
    whole = context + continuation
    assert ids == tok(whole, add_special_tokens=False)["input_ids"]
    assert whole.endswith(scored) and len(scored) >= len(continuation)
    scored_bytes = b"".join(token_bytes(tok, i, style) for i in ids[n_ctx:])
    if style == "sentencepiece" and n_ctx == 0:
        scored_bytes = scored_bytes[1:]  # the "▁" Metaspace prepends to a text is not in the text
    assert scored_bytes == scored.encode("utf-8")
    return n_ctx < len(tok(context, add_special_tokens=False)["input_ids"]) if context else False


@pytest.mark.parametrize("style", ["byte_level", "sentencepiece"])
def test_scored_bytes_match_scored_tokens_for_real_tokenizers(style, byte_level_tokenizer, sentencepiece_tokenizer):
    tok = byte_level_tokenizer if style == "byte_level" else sentencepiece_tokenizer
    straddled = [check_byte_accounting(tok, style, c, x) for c, x in BOUNDARY_CASES]
    assert any(straddled), "no case put a token across the boundary; the test would prove nothing"
    assert not straddled[0]


def test_boundary_inside_a_multibyte_character():
    # "П" is bytes D0 9F and "р" D1 80; a merge joins 9F with D1 80, so in "Пр" the second token
    # starts inside "П". Scoring must move back to a character boundary (here: the start).
    alphabet = byte_alphabet()
    tok = hand_bpe_tokenizer(alphabet + ["ÑĢ", "ŁÑĢ"], [("Ñ", "Ģ"), ("Ł", "ÑĢ")], byte_level=True)
    assert tok.convert_ids_to_tokens(tok("Пр", add_special_tokens=False)["input_ids"]) == ["Ð", "ŁÑĢ"]
    assert continuation_tokens(tok, "П", "р") == (tok("Пр", add_special_tokens=False)["input_ids"], 0, "Пр")
    assert check_byte_accounting(tok, "byte_level", "xП", "рy")


@pytest.mark.parametrize("trim_offsets", [False, True])
def test_boundary_token_with_a_leading_space(trim_offsets):
    # "Ġqu" straddles "a q" | "u"; with trimmed offsets its span leaves out the space it encodes.
    alphabet = byte_alphabet()
    tok = hand_bpe_tokenizer(alphabet + ["Ġq", "Ġqu"], [("Ġ", "q"), ("Ġq", "u")], byte_level=True,
                             trim_offsets=trim_offsets)
    ids, n_ctx, scored = continuation_tokens(tok, "a q", "u")
    assert (n_ctx, scored) == (1, " qu")
    assert check_byte_accounting(tok, "byte_level", "a q", "u")


def test_accuracy_uses_the_boundary_accounting_end_to_end(byte_level_tokenizer):
    # No delimiter: choices continue a word; a uniform model's per-byte score is -ln V * tokens / bytes.
    tok = byte_level_tokenizer
    items = [ChoiceItem("The qui", ("ck brown fox", "et evening", "zzz"), 0),
             ChoiceItem("Привіт, сві", ("те!", "тло", "т"), 2)]
    expected = 0.0
    for item in items:
        scores = []
        for choice in item.choices:
            ids, n_ctx, scored = continuation_tokens(tok, item.context, choice)
            n_bytes = len(b"".join(token_bytes(tok, i, "byte_level") for i in ids[n_ctx:]))
            scores.append(-math.log(len(tok)) * (len(ids) - n_ctx) / n_bytes)
        best = [j for j, s in enumerate(scores) if s == max(scores)]
        expected += (item.label in best) / len(best)
    model = ConstantLM(torch.zeros(len(tok)))
    result = multiple_choice_accuracy(model, tok, items, delimiter="", progress=False)
    assert result["accuracy"] == pytest.approx(expected / len(items))
