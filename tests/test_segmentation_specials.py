"""Special tokens written in the text and [UNK] (issue 12): the two sides must cover the same characters.

Before the fix, a chat marker that is a special token for the teacher got -100 while the student's
pieces of the same characters were folded into a neighbouring segment; and [UNK] counted as special
when only the backend model named it. Checked against the slow reference of `test_segmentation`."""

from __future__ import annotations

import copy

import pytest

from matt.segmentation import IGNORE_INDEX, SegmentationStats, segment_document, unknown_token_id
from test_segmentation import assert_chunks_cover_document, check, reference_tokens

CHAT = ("<|im_start|>user\nЯк справи? How are you<|im_end|>\n<|im_start|>assistant\n"
        "Добре, дякую! Fine, thanks<|im_end|>\n")
MARKERS = ["<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def chat_teacher(tokenizer_zoo):
    """An instruction-tuned teacher: the chat markers are special tokens (BOS inserted too)."""
    teacher = copy.deepcopy(tokenizer_zoo["llama3"])
    teacher.add_tokens(MARKERS, special_tokens=True)
    return teacher


def marker_positions(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    marker_ids = set(tokenizer.convert_tokens_to_ids(MARKERS))
    return [i for i, token_id in enumerate(ids) if token_id in marker_ids]


@pytest.mark.parametrize("student", ["llama2", "gpt2", "gemma", "unigram", "char_spaces", "nfkc_lower"])
def test_chat_markers_in_the_text_take_part_like_content(tokenizer_zoo, chat_teacher, student):
    student_tok = tokenizer_zoo[student]
    for teacher, other in ((chat_teacher, student_tok), (student_tok, chat_teacher)):
        t_ids, s_ids = check(CHAT, teacher, other)  # == reference; same characters, same segments
        for tok, ids in ((teacher, t_ids), (other, s_ids)):
            inserted = tok(CHAT, return_special_tokens_mask=True)["special_tokens_mask"]
            assert [seg == IGNORE_INDEX for seg in ids] == [bool(m) for m in inserted]  # only BOS/EOS
    t_ids, _ = check(CHAT, chat_teacher, student_tok)
    positions = marker_positions(chat_teacher, CHAT)
    assert len(positions) == 4 and all(t_ids[i] != IGNORE_INDEX for i in positions)
    # segment 0 starts at the first marker's first character on both sides ("<|im_start|>..." ),
    # never at "user" on one side and at "<" on the other
    tokens = reference_tokens(CHAT, chat_teacher)
    first = next(i for i, seg in enumerate(t_ids) if seg == 0)
    assert tokens[first]["chars"][0] == 0


def test_chat_documents_chunk_consistently(tokenizer_zoo, chat_teacher):
    text = CHAT * 3
    for max_length in (12, 40):
        stats = SegmentationStats()
        examples = segment_document(text, chat_teacher, tokenizer_zoo["llama2"], max_length=max_length, stats=stats)
        assert_chunks_cover_document(text, chat_teacher, tokenizer_zoo["llama2"], examples, max_length, stats)


def wordpiece_with_unk():
    """A `tokenizers` WordPiece trained with "[UNK]" as a special token: what users wrap in
    `PreTrainedTokenizerFast` without naming the unknown token."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    from matt.tiny import SAMPLE_TEXTS

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    latin = [t for t in SAMPLE_TEXTS if t.isascii()] or ["hello world"]
    tok.train_from_iterator(latin * 4, trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[UNK]", "[PAD]"]))
    return tok


@pytest.mark.parametrize("wrapping", ["tokenizer_file", "tokenizer_object"])
def test_unknown_token_named_only_by_the_backend_is_content(tmp_path, tokenizer_zoo, wrapping):
    from transformers import PreTrainedTokenizerFast

    backend = wordpiece_with_unk()
    if wrapping == "tokenizer_file":
        backend.save(str(tmp_path / "tokenizer.json"))
        student = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    else:
        student = PreTrainedTokenizerFast(tokenizer_object=backend)
    assert student.unk_token is None  # the wrapper does not know it
    unk = student.convert_tokens_to_ids("[UNK]")
    assert unknown_token_id(student) == unk
    text = "See https://例え.jp/ελληνικά — 漢字 text"
    assert unk in student(text)["input_ids"]
    for teacher in ("llama3", "gemma", "llama2"):
        _, s_ids = check(text, tokenizer_zoo[teacher], student)
        ids = student(text)["input_ids"]
        assert all(seg != IGNORE_INDEX for seg, token_id in zip(s_ids, ids) if token_id == unk)
