"""bits/byte split into bytes covered by new vs shared student tokens, against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from evaluation_helpers import ConstantLM, hand_bpe_tokenizer

from matt.evaluation.bpb import NewByteMasks, bits_per_byte

LN2 = math.log(2)


@pytest.fixture
def tokenizers():
    # Character-level teacher plus one merged token "b " that straddles a new/shared boundary;
    # the student merges "ab", which the teacher does not have (new), and keeps a, b, " " (shared).
    teacher = hand_bpe_tokenizer(["a", "b", " ", "b "], merges=[("b", " ")])
    student = hand_bpe_tokenizer(["a", "b", " ", "ab"], merges=[("a", "b")])
    return teacher, student


def test_masks_mark_the_bytes_of_new_student_tokens(tokenizers):
    teacher, student = tokenizers
    text = "ab a b ab"  # student: [ab][ ][a][ ][b][ ][ab]
    assert student.convert_ids_to_tokens(student(text, add_special_tokens=False)["input_ids"]) == \
        ["ab", " ", "a", " ", "b", " ", "ab"]
    masks = NewByteMasks.from_tokenizers(teacher, student, [text, "a b"])
    assert masks.masks[0].tolist() == [True, True, False, False, False, False, False, True, True]
    assert masks.masks[1].tolist() == [False, False, False]
    assert masks.new_byte_fraction == pytest.approx(4 / 12)


def test_student_split_is_exact(tokenizers):
    teacher, student = tokenizers
    logits = torch.tensor([0.0, 0.0, 0.0, 1.0, 2.0, 0.5, 3.0])  # <s> </s> <pad> a b " " ab
    model = ConstantLM(logits)
    nll = {token: -model.log_prob(student.convert_tokens_to_ids(token)) for token in ("a", "b", " ", "ab")}
    text = "ab a b ab"
    result = bits_per_byte(model, student, [text], progress=False,
                           new_bytes=NewByteMasks.from_tokenizers(teacher, student, [text]))
    assert result.bpb_new == pytest.approx(2 * nll["ab"] / LN2 / 4)
    assert result.bpb_shared == pytest.approx((3 * nll[" "] + nll["a"] + nll["b"]) / LN2 / 5)
    assert result.new_byte_fraction == pytest.approx(4 / 9)
    # the parts add up to the whole
    assert result.bpb == pytest.approx((4 * result.bpb_new + 5 * result.bpb_shared) / 9)


def test_teacher_tokens_spread_evenly_over_their_bytes(tokenizers):
    teacher, student = tokenizers
    text = "ab a"  # student [ab][ ][a]: bytes 0-1 new; teacher [a][b ][a]: "b " straddles bytes 1 (new) and 2
    assert teacher.convert_ids_to_tokens(teacher(text, add_special_tokens=False)["input_ids"]) == ["a", "b ", "a"]
    logits = torch.tensor([0.0, 0.0, 0.0, 1.5, 0.2, 0.0, 2.5])  # <s> </s> <pad> a b " " "b "
    model = ConstantLM(logits)
    a, b_space = -model.log_prob(3), -model.log_prob(6)
    result = bits_per_byte(model, teacher, [text], progress=False,
                           new_bytes=NewByteMasks.from_tokenizers(teacher, student, [text]))
    assert result.bpb_new == pytest.approx((a + b_space / 2) / LN2 / 2)
    assert result.bpb_shared == pytest.approx((b_space / 2 + a) / LN2 / 2)


def test_windows_keep_the_token_order(tokenizers):
    teacher, student = tokenizers
    text = "ab a b ab " * 7
    model = ConstantLM(torch.tensor([0.0, 0.0, 0.0, 1.0, 2.0, 0.5, 3.0]))
    masks = NewByteMasks.from_tokenizers(teacher, student, [text])
    whole = bits_per_byte(model, student, [text], progress=False, new_bytes=masks, max_length=1024)
    windowed = bits_per_byte(model, student, [text], progress=False, new_bytes=masks, max_length=5)
    assert (windowed.bpb_new, windowed.bpb_shared) == pytest.approx((whole.bpb_new, whole.bpb_shared))


def test_masks_of_other_texts_are_refused(tokenizers):
    teacher, student = tokenizers
    masks = NewByteMasks([np.zeros(3, dtype=bool)])
    with pytest.raises(ValueError, match="do not match"):
        bits_per_byte(ConstantLM(torch.zeros(7)), student, ["ab a b"], progress=False, new_bytes=masks)
