"""`init=subword_mean`: a new token starts at the mean teacher row of the teacher's decomposition of
its exact bytes; also FOCUS's fallback for new tokens without a fastText vector.

Checked on a hand-built tokenizer pair whose decompositions can be worked out on paper (merge
order matters: " abc" is [Ġ, abc], not [Ġab, c]; a byte-level token holding part of a Cyrillic
character decomposes into the teacher's pieces of those bytes), for a byte-level and a Metaspace
(byte-fallback) teacher, and against a slow literal implementation on the test tokenizer zoo.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from matt.initialization import initialize_embeddings, teacher_decomposition
from matt.overlap import token_bytes, token_overlap

DIM = 6


def _byte_level_tokenizer(merges: list[tuple[str, str]]):
    """A byte-level BPE over the 256 byte characters plus `merges` (applied in this order), <s> special."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    vocab["<s>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>")


def _metaspace_tokenizer(merges: list[tuple[str, str]]):
    """A Metaspace BPE (prepend "▁" to the first word, as Llama 2) with <0xNN> byte fallback."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for ch in "▁abc":
        vocab[ch] = len(vocab)
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def student():
    """New tokens relative to both teachers: "abcab", " abc", "ÑĸÑ" (bytes D1 96 D1: "і" plus the
    first byte of the next Cyrillic letter) and "abc" for the Metaspace teacher."""
    return _byte_level_tokenizer([("a", "b"), ("ab", "c"), ("abc", "ab"), ("Ġ", "abc"), ("Ñ", "ĸ"), ("Ñĸ", "Ñ")])


def literal_subword_mean(rows: torch.Tensor, teacher, expected: dict[int, list[str]]) -> dict[int, torch.Tensor]:
    """The definition, spelled out: the mean of the teacher rows of the hand-worked teacher pieces."""
    return {s_id: torch.stack([rows[teacher.convert_tokens_to_ids(p)] for p in pieces]).double().mean(0).float()
            for s_id, pieces in expected.items()}


def check_against_hand_worked(teacher, student, expected_pieces: dict[str, list[str]]):
    rows = torch.randn(len(teacher), DIM, generator=torch.Generator().manual_seed(0))
    result = initialize_embeddings(rows, teacher, student, "subword_mean")
    ids = {student.convert_tokens_to_ids(token): pieces for token, pieces in expected_pieces.items()}
    new = [i for i in range(len(student)) if i not in result.overlap.student_to_teacher]
    assert sorted(new) == sorted(ids)  # exactly the hand-listed tokens are new
    assert {i: [teacher.convert_ids_to_tokens(t) for t in result.decompositions[i]] for i in ids} == ids
    expected_rows = literal_subword_mean(rows, teacher, ids)
    for s_id in ids:
        assert result.kinds[s_id] == "subword_mean"
        torch.testing.assert_close(result.embeddings[s_id], expected_rows[s_id], rtol=0, atol=1e-6)
    for s_id, t_id in result.overlap.student_to_teacher.items():  # shared rows untouched
        assert torch.equal(result.embeddings[s_id], rows[t_id])
    assert result.counts["subword_mean"] == len(ids) and result.counts["random"] == 0


def test_byte_level_teacher_hand_worked(student):
    teacher = _byte_level_tokenizer([("a", "b"), ("ab", "c"), ("Ġ", "ab"), ("Ñ", "ĸ")])
    check_against_hand_worked(teacher, student, {
        "abcab": ["abc", "ab"],
        "Ġabc": ["Ġ", "abc"],  # merge (a, b) ranks before (Ġ, ab): " abc" -> Ġ ab c -> Ġ abc
        "ÑĸÑ": ["Ñĸ", "Ñ"],  # not valid UTF-8: decomposed through the byte-level spelling
    })


def test_metaspace_teacher_hand_worked(student):
    """The Metaspace teacher would encode the text "abc" as "▁abc" (it prepends ▁ to the first word):
    a different string. The decomposition must spell exactly the token's bytes, with <0xNN> pieces
    for "і" (not in its vocabulary) and for the lone first byte of a character."""
    teacher = _metaspace_tokenizer([("a", "b"), ("▁", "ab")])
    assert teacher("abc", add_special_tokens=False).input_ids[0] == teacher.convert_tokens_to_ids("▁ab")
    check_against_hand_worked(teacher, student, {
        "abc": ["ab", "c"],
        "abcab": ["ab", "c", "ab"],
        "Ġabc": ["▁ab", "c"],  # " abc": here the text path is exact (" " -> "▁", nothing prepended)
        "Ñĸ": ["<0xD1>", "<0x96>"],
        "ÑĸÑ": ["<0xD1>", "<0x96>", "<0xD1>"],
    })


def literal_decomposition(teacher, student, s_id: int) -> list[int] | None:
    """Slow reading of the definition for tokens whose text the teacher spells back exactly: encode the
    token's text with the teacher, no special tokens."""
    data = token_bytes(student)[s_id]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    ids = teacher(text, add_special_tokens=False)["input_ids"]
    teacher_bytes = token_bytes(teacher)
    return ids if b"".join(teacher_bytes[t] for t in ids) == data else None


@pytest.mark.parametrize("pair", [("llama3", "llama2"), ("llama2", "llama3"), ("gemma", "gpt2")])
def test_zoo_pairs_match_the_literal_definition(tokenizer_zoo, pair):
    """Every new token with bytes gets a decomposition that spells its bytes exactly; where the teacher
    spells the token's text back, it is exactly the teacher's encoding of that text."""
    teacher, student = tokenizer_zoo[pair[0]], tokenizer_zoo[pair[1]]
    overlap = token_overlap(teacher, student)
    new = [i for i in range(len(student)) if i not in overlap.student_to_teacher]
    student_bytes, teacher_bytes = token_bytes(student), token_bytes(teacher)
    decompositions = teacher_decomposition(teacher, student, new)
    with_bytes = [i for i in new if student_bytes[i]]
    assert len(with_bytes) > 30 and sorted(decompositions) == with_bytes
    literal_hits = 0
    for s_id, pieces in decompositions.items():
        assert b"".join(teacher_bytes[t] for t in pieces) == student_bytes[s_id]
        literal = literal_decomposition(teacher, student, s_id)
        if literal is not None:
            assert pieces == literal
            literal_hits += 1
    assert literal_hits > len(decompositions) // 4  # the comparison with the literal encoding is not vacuous


def test_untied_rows_average_input_and_output_alike(tokenizer_zoo):
    """An untied model's (V, 2D) source: the same decomposition averages both halves."""
    teacher, student = tokenizer_zoo["llama3"], tokenizer_zoo["llama2"]
    rows = torch.randn(len(teacher), 2 * DIM, generator=torch.Generator().manual_seed(1))
    result = initialize_embeddings(rows, teacher, student, "subword_mean")
    assert result.counts["subword_mean"] > 30
    for s_id, pieces in result.decompositions.items():
        torch.testing.assert_close(result.embeddings[s_id], rows[pieces].mean(0), rtol=1e-6, atol=1e-6)


class _NoVectors:
    """A fastText stand-in with vectors for only some tokens."""

    def __init__(self, vectors):
        self.words, self.vectors = list(vectors), vectors

    def get_word_vector(self, word):
        return self.vectors[word]


def test_focus_falls_back_to_subword_mean(tokenizer_zoo, caplog):
    teacher, student = tokenizer_zoo["llama3"], tokenizer_zoo["llama2"]
    overlap = token_overlap(teacher, student)
    new = [i for i in range(len(student)) if i not in overlap.student_to_teacher and token_bytes(student)[i]]
    shared = [i for i in overlap.student_to_teacher if token_bytes(student)[i]]
    rng = np.random.default_rng(0)
    vectors = {student.convert_ids_to_tokens(i): rng.normal(size=8).astype(np.float32) for i in shared[:20] + new[:10]}
    rows = torch.randn(len(teacher), DIM, generator=torch.Generator().manual_seed(2))
    with caplog.at_level("INFO", logger="matt.initialization"):
        result = initialize_embeddings(rows, teacher, student, "focus", fasttext_model=_NoVectors(vectors))
    assert all(result.kinds[i] == "focus" for i in new[:10])
    left = new[10:]
    assert all(result.kinds[i] == "subword_mean" for i in left)
    plain = initialize_embeddings(rows, teacher, student, "subword_mean")
    for i in left:
        assert torch.equal(result.embeddings[i], plain.embeddings[i])
    assert f"{len(left)} initialised by subword_mean" in caplog.text
    drawn = initialize_embeddings(rows, teacher, student, "focus", fasttext_model=_NoVectors(vectors),
                                  focus_fallback="random")
    assert all(drawn.kinds[i] == "random" for i in left)
    with pytest.raises(ValueError, match="focus_fallback"):
        initialize_embeddings(rows, teacher, student, "focus", fasttext_model=_NoVectors(vectors), focus_fallback="x")
