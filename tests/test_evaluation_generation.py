"""Generative proxy: item cutting, greedy continuation, chrF."""

from __future__ import annotations

import logging

import pytest
import sacrebleu
import torch

from matt.evaluation import GenerationItem, build_generation_items, generation_chrf, greedy_continuations
from matt.evaluation import generation as generation_module
from matt.evaluation.scoring import prefix_token_id
from matt.tiny import SAMPLE_TEXTS, tiny_model


def word_documents(n: int = 6) -> list[str]:
    return [" ".join(f"w{d}x{i}" for i in range(40)) + ".\nLast line  of\tdoc." for d in range(n)]


def locate(item: GenerationItem, docs: list[str]) -> int:
    """Index of the document the item was cut from; checks the cut along the way."""
    for index, doc in enumerate(docs):
        start = doc.find(item.prompt)
        if start < 0:
            continue
        end = start + len(item.prompt)
        assert start == 0 or doc[start - 1].isspace()  # the prompt starts at a word start
        assert doc[end].isspace() and not item.prompt[-1].isspace()  # and ends at a word end
        assert doc[end:].lstrip().startswith(item.target)
        return index
    raise AssertionError(f"prompt {item.prompt!r} not found in any document")


def test_items_are_cut_at_whitespace_one_per_document():
    docs = word_documents()
    items = build_generation_items(docs, num_items=5, prompt_chars=30, target_chars=12, seed=0)
    assert len(items) == 5
    sources = [locate(item, docs) for item in items]
    assert len(set(sources)) == 5
    for item in items:
        assert 0 < len(item.prompt) <= 30 and len(item.target) == 12 and not item.target[0].isspace()
    assert items == build_generation_items(docs, num_items=5, prompt_chars=30, target_chars=12, seed=0)
    assert items != build_generation_items(docs, num_items=5, prompt_chars=30, target_chars=12, seed=1)


def test_short_documents_are_skipped_and_counted(caplog):
    docs = ["too short", "x" * 500, *word_documents(2)]  # the second has no whitespace to cut at
    with caplog.at_level(logging.INFO, logger="matt.evaluation.generation"):
        items = build_generation_items(docs, num_items=4, prompt_chars=30, target_chars=12, seed=0)
    assert len(items) == 2
    assert "Skipped 2 document(s)" in caplog.text and "Built only 2 of 4" in caplog.text
    with pytest.raises(ValueError, match="must be >= 1"):
        build_generation_items(docs, num_items=0)


def manual_greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """One prompt at a time, no cache, no padding: append the argmax until EOS or the budget."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = [prefix_token_id(tokenizer), *prompt_ids]
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
    prompt_text = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    full = tokenizer.decode(prompt_ids + new, skip_special_tokens=True)
    assert full.startswith(prompt_text)
    return full[len(prompt_text) :]


PROMPTS = ["The quick brown", "Привіт, світе! Це короткий український", "A", "Numbers like 3.14159 and"]


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_greedy_continuation_equals_a_manual_argmax_loop(family, byte_level_tokenizer):
    tok = byte_level_tokenizer
    model = tiny_model(family, len(tok))
    expected = [manual_greedy(model, tok, prompt, 10) for prompt in PROMPTS]
    assert any(expected)
    # Batched with left padding (prompts differ in length) and one at a time: the same text.
    assert greedy_continuations(model, tok, PROMPTS, max_new_tokens=10, batch_size=3, progress=False) == expected
    # Settings a checkpoint may carry (the old vocabulary's EOS id, a repetition penalty) are ignored.
    emitted = tok(expected[0], add_special_tokens=False)["input_ids"]
    model.generation_config.eos_token_id = emitted[0]
    model.generation_config.repetition_penalty = 5.0
    assert greedy_continuations(model, tok, PROMPTS, max_new_tokens=10, batch_size=4, progress=False) == expected


def test_chrf_equals_sacrebleu_on_the_same_strings(sentencepiece_tokenizer):
    tok = sentencepiece_tokenizer
    model = tiny_model("qwen3", len(tok))
    items = build_generation_items(SAMPLE_TEXTS, num_items=4, prompt_chars=25, target_chars=15, seed=0)
    assert len(items) == 4
    hypotheses = [manual_greedy(model, tok, item.prompt, 12).lstrip()[: len(item.target)] for item in items]
    expected = sacrebleu.metrics.CHRF().corpus_score(hypotheses, [[item.target for item in items]]).score
    result = generation_chrf(model, tok, items, max_new_tokens=12, batch_size=3, progress=False)
    assert result == {"chrf": pytest.approx(expected), "n": 4}


def test_generations_are_stripped_and_cut_to_the_target_length(monkeypatch):
    items = [GenerationItem("p1", "abc def"), GenerationItem("p2", "ghij")]
    generated = ["  abc defXYZ and more", "ghij"]
    monkeypatch.setattr(generation_module, "greedy_continuations", lambda *args, **kwargs: generated)
    assert generation_chrf(None, None, items)["chrf"] == pytest.approx(100.0)
    # Without the cut the extra text would be penalised: the cut is what makes lengths comparable.
    uncut = sacrebleu.metrics.CHRF().corpus_score(["abc defXYZ and more", "ghij"], [["abc def", "ghij"]]).score
    assert uncut < 100.0


def test_empty_generations_score_zero_without_crashing(byte_level_tokenizer):
    model = tiny_model("qwen3", len(byte_level_tokenizer))
    torch.nn.init.zeros_(model.lm_head.weight)  # argmax is always id 0, the <s> special token
    assert greedy_continuations(model, byte_level_tokenizer, PROMPTS[:2], max_new_tokens=3, progress=False) == ["", ""]
    items = [GenerationItem("The quick brown", "fox jumps"), GenerationItem("Привіт,", "світе!")]
    assert generation_chrf(model, byte_level_tokenizer, items, max_new_tokens=3, progress=False) == {
        "chrf": 0.0, "n": 2}
    with pytest.raises(ValueError, match="No generation items"):
        generation_chrf(model, byte_level_tokenizer, [], progress=False)
    with pytest.raises(TypeError, match="not a single string"):
        greedy_continuations(model, byte_level_tokenizer, "a prompt", progress=False)
