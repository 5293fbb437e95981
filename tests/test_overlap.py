"""Byte-canonical vocabulary overlap (matt.overlap) — including the deepfocus "�" regression."""

from __future__ import annotations

import random

import pytest
import torch

from matt.overlap import token_bytes, token_overlap, tokenizer_style


@pytest.fixture(scope="module")
def teacher_bl(text_tools):
    """Byte-level teacher (Llama-3 style)."""
    return text_tools.build("llama3", text_tools.training_corpus(), 900)


def permuted_ids(tokenizer, seed: int):
    """The same tokenizer with its non-special ids shuffled (tokens, merges and specials unchanged)."""
    import json

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = state["model"]["vocab"]
    fixed = {t["content"] for t in state["added_tokens"]}
    movable = sorted((i for tok, i in vocab.items() if tok not in fixed))
    shuffled = movable[:]
    random.Random(seed).shuffle(shuffled)
    new_id = dict(zip(movable, shuffled))
    state["model"]["vocab"] = {tok: new_id.get(i, i) for tok, i in vocab.items()}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(state)), bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="module")
def student_bl(text_tools):
    """Another byte-level vocabulary on other text, ids shuffled so that even its single-byte tokens
    have other ids than the teacher's."""
    return permuted_ids(text_tools.build("gpt2", text_tools.training_corpus(seed=1, n=150), 500), seed=0)


def partial_utf8_ids(tokenizer) -> list[int]:
    """Ids of tokens that are not whole UTF-8 (they decode to U+FFFD)."""
    return [i for i in range(len(tokenizer)) if "\ufffd" in tokenizer.decode([i])]


def test_partial_utf8_tokens_collide_when_keyed_by_decode_but_not_by_bytes(teacher_bl, student_bl):
    """The deepfocus pitfall: keying tokens by `decode(id)` maps many distinct byte-level tokens to the
    same "�" (and deepfocus's matcher then pairs them with the wrong teacher rows). Byte keys do not."""
    from deepfocus.focus import get_overlapping_tokens

    partial = partial_utf8_ids(student_bl)
    assert len(partial) > 50
    assert len({student_bl.decode([i]) for i in partial}) < len(partial) / 5  # massive collisions

    overlap = token_overlap(teacher_bl, student_bl)
    teacher_tokens, student_tokens = teacher_bl.convert_ids_to_tokens, student_bl.convert_ids_to_tokens
    t_bytes, s_bytes = token_bytes(teacher_bl), token_bytes(student_bl)
    teacher_vocab = teacher_bl.get_vocab()
    for s_id in partial:
        t_id = overlap.student_to_teacher.get(s_id)
        if student_tokens(s_id) in teacher_vocab:
            assert t_bytes[t_id] == s_bytes[s_id]
            assert teacher_tokens(t_id) == student_tokens(s_id)  # same byte-level spelling
        else:  # a multi-byte fragment the teacher never learned
            assert t_id is None
    single_bytes = [i for i in partial if len(s_bytes[i]) == 1]
    assert len(single_bytes) >= 128 and all(i in overlap.student_to_teacher for i in single_bytes)
    assert sum(overlap.student_to_teacher[i] != i for i in single_bytes) > 100  # ids really differ

    deepfocus_overlap, _ = get_overlapping_tokens(student_bl, teacher_bl, match_symbols=False,
                                                  exact_match_all=True, fuzzy_match_all=False)
    wrong = [token for token, info in deepfocus_overlap.items() if info.source[0].native_form != token]
    assert len(wrong) > 20, "expected deepfocus's decode keying to mismatch partial UTF-8 tokens"
    for token in wrong:
        s_id = student_bl.convert_tokens_to_ids(token)
        t_id = overlap.student_to_teacher.get(s_id)
        assert t_id is None or teacher_tokens(t_id) == token


def test_every_byte_level_token_maps_to_the_teacher_token_with_the_same_bytes(teacher_bl, student_bl):
    overlap = token_overlap(teacher_bl, student_bl)
    teacher_vocab = teacher_bl.get_vocab()
    specials = set(student_bl.all_special_ids) | {i for i, t in student_bl.added_tokens_decoder.items() if t.special}
    for token, s_id in student_bl.get_vocab().items():
        if s_id in specials:
            continue
        if token in teacher_vocab:
            assert overlap.student_to_teacher[s_id] == teacher_vocab[token], token
        else:
            assert s_id not in overlap.student_to_teacher, token


def test_token_bytes_concatenate_to_the_text(tokenizer_zoo, text_tools):
    """The bytes of a tokenization spell the text: checks the byte-level table, "▁" handling and
    <0xNN> byte fallback on real tokenizations (no special or unknown tokens in these texts)."""
    rng = random.Random(11)
    texts = [text_tools.random_text(rng).replace("<s>", "") for _ in range(30)]
    for name in ("gpt2", "llama3", "qwen", "llama2", "mistral_eos", "gemma", "char_spaces", "unigram"):
        tok = tokenizer_zoo[name]
        table = token_bytes(tok)
        for text in texts:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            spelled = b"".join(table[i] for i in ids)
            expected = text.encode("utf-8")
            if name in ("llama2", "mistral_eos", "unigram") and not text.startswith(" "):
                expected = b" " + expected  # Metaspace prepends "▁" to the first word
            assert spelled == expected, (name, text)


def test_styles_are_detected(tokenizer_zoo):
    expected = {"gpt2": "byte_level", "llama3": "byte_level", "qwen": "byte_level", "llama2": "metaspace",
                "llama2_legacy": "metaspace", "gemma": "metaspace", "unigram": "metaspace", "char_spaces": "plain"}
    for name, style in expected.items():
        assert tokenizer_style(tokenizer_zoo[name])[0] == style, name
    with pytest.raises(ValueError, match="WordLevel"):
        tokenizer_style(tokenizer_zoo["wordlevel"])


def test_cross_style_matching(tokenizer_zoo, text_tools):
    """byte-level "Ġсвіт" ↔ metaspace "▁світ"; byte-level "Ñ" ↔ byte fallback "<0xD1>"; "Ġ" ↔ "▁"."""
    corpus = text_tools.training_corpus() + ["світ світ світ світ"] * 20
    byte_level = text_tools.build("llama3", corpus, 900)
    metaspace = text_tools.build("llama2", corpus, 400)
    gemma = text_tools.build("gemma", corpus, 400)
    assert byte_level.convert_ids_to_tokens(byte_level(" світ", add_special_tokens=False)["input_ids"]) == ["ĠÑģÐ²ÑĸÑĤ"]
    pairs = [("ĠÑģÐ²ÑĸÑĤ", "▁світ"), ("Ñ", "<0xD1>"), ("Ġ", "▁"), ("ð", "<0xF0>"), ("Ġthe", "▁the")]
    for other in (metaspace, gemma):
        assert "▁світ" in other.get_vocab() and "<0xD1>" in other.get_vocab()
        forward = token_overlap(byte_level, other)  # metaspace student, byte-level teacher
        backward = token_overlap(other, byte_level)
        for bl_token, ms_token in pairs:
            bl_id, ms_id = byte_level.convert_tokens_to_ids(bl_token), other.convert_tokens_to_ids(ms_token)
            assert forward.student_to_teacher[ms_id] == bl_id, (bl_token, ms_token)
            if ms_token != "▁":
                assert backward.student_to_teacher[bl_id] == ms_id, (bl_token, ms_token)
        # "Ġ" is b" " like both "▁" and "<0x20>": the lower id wins deterministically
        space_ids = sorted(other.convert_tokens_to_ids(t) for t in ("▁", "<0x20>"))
        assert backward.student_to_teacher[byte_level.convert_tokens_to_ids("Ġ")] == space_ids[0]
    # the same spelling wins over the lower id: "<0x20>" maps to "<0x20>", not to "▁"
    same = token_overlap(metaspace, gemma)
    assert same.student_to_teacher[gemma.convert_tokens_to_ids("<0x20>")] == metaspace.convert_tokens_to_ids("<0x20>")


def test_specials_are_matched_by_role_then_by_content(text_tools):
    from tokenizers import AddedToken

    corpus = text_tools.training_corpus()
    teacher = text_tools.build("llama3", corpus, 600)
    student = text_tools.build("llama2", corpus, 300)
    # rename the teacher's specials (Llama-3 style names), add a shared chat marker to both
    teacher.add_special_tokens({"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"})
    for tok in (teacher, student):
        tok.add_tokens([AddedToken("<|im_start|>", special=True)], special_tokens=True)
    student.add_tokens([AddedToken("<|student_only|>", special=True)], special_tokens=True)
    assert "the" in teacher.get_vocab()
    student.add_tokens([AddedToken("the", special=True)], special_tokens=True)  # special here, text there
    overlap = token_overlap(teacher, student)
    m = overlap.student_to_teacher
    assert m[student.bos_token_id] == teacher.bos_token_id == teacher.convert_tokens_to_ids("<|begin_of_text|>")
    assert m[student.eos_token_id] == teacher.eos_token_id
    assert m[student.pad_token_id] == teacher.pad_token_id
    assert m[student.convert_tokens_to_ids("<|im_start|>")] == teacher.convert_tokens_to_ids("<|im_start|>")
    assert student.convert_tokens_to_ids("<|student_only|>") not in m
    assert student.unk_token_id not in m  # the byte-level teacher has no <unk>
    assert overlap.num_special_matched == 4
    # a special token never matches an ordinary teacher token that happens to have the same string
    assert student.convert_tokens_to_ids("the") not in m


def test_non_special_added_tokens_match_by_content(text_tools):
    corpus = text_tools.training_corpus()
    teacher = text_tools.build("llama3", corpus, 600)
    student = text_tools.build("llama2", corpus, 300)
    student.add_tokens(["hello world"])  # added, not special: stands for its text
    teacher.add_tokens(["hello world"])
    overlap = token_overlap(teacher, student)
    assert overlap.student_to_teacher[student.convert_tokens_to_ids("hello world")] == \
        teacher.convert_tokens_to_ids("hello world")


def test_frozen_mask_ratio_and_summary(tokenizer_zoo):
    teacher, student = tokenizer_zoo["llama3"], tokenizer_zoo["llama2"]
    overlap = token_overlap(teacher, student)
    mask = overlap.frozen_mask()
    assert mask.dtype == torch.bool and mask.shape == (len(student),)
    assert set(torch.nonzero(mask).flatten().tolist()) == set(overlap.student_to_teacher)
    assert 0 < overlap.num_shared < len(student)
    assert overlap.num_shared + overlap.num_new == len(student)
    assert overlap.ratio == pytest.approx(int(mask.sum()) / len(student))
    summary = overlap.summary()
    assert summary["ratio"] == overlap.ratio and summary["student_style"] == "metaspace"
    assert summary["teacher_style"] == "byte_level"
    # all 256 byte-fallback tokens exist in a byte-level teacher
    byte_ids = [student.convert_tokens_to_ids(f"<0x{b:02X}>") for b in range(256)]
    assert all(mask[byte_ids])
    # identical tokenizers share everything
    same = token_overlap(teacher, teacher)
    assert same.ratio == 1.0 and all(s == t for s, t in same.student_to_teacher.items())


def test_slow_tokenizer_is_rejected(tokenizer_zoo):
    from transformers import ByT5Tokenizer

    with pytest.raises(TypeError, match="fast"):
        token_overlap(tokenizer_zoo["llama3"], ByT5Tokenizer())
