"""Log-likelihood scoring, bits per byte, the unigram floor and compression, against hand values."""

from __future__ import annotations

import copy
import json
import logging
import math
import random

import pytest
import torch
from evaluation_helpers import BigramLM, ConstantLM, TwoTokenLM, hand_bpe_tokenizer

from matt.evaluation import BPBResult, UnigramModel, bits_per_byte, compression, score_sequences
from matt.evaluation.bpb import windows
from matt.evaluation.scoring import prefix_token_id
from matt.result import TransferResult
from matt.tiny import FAMILIES, tiny_model

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "Привіт, світе! Це короткий український текст для перевірки токенізатора.",
    "Numbers like 3.14159 and 2026-11-22, code like `x = f(y) + 1`.",
    "Tokenizer transfer keeps what a model knows while changing how text is cut into pieces.",
    "Zażółć gęślą jaźń 🙂",
]


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def utf8_len(texts) -> int:
    return sum(len(text.encode("utf-8")) for text in texts)


# --- score_sequences ------------------------------------------------------------------------


def slow_nll(model, seq: list[int], num_context: int) -> float:
    """One unpadded sequence at a time; -log softmax written out (max-shifted log-sum-exp) in float64."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([seq])).logits[0].double()
    total = 0.0
    for t in range(num_context, len(seq)):
        row = logits[t - 1].tolist()
        top = max(row)
        log_sum_exp = top + math.log(sum(math.exp(x - top) for x in row))
        total += log_sum_exp - row[seq[t]]
    return total


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_score_sequences_matches_per_sequence_softmax_by_hand(family):
    vocab = 97
    model = tiny_model(family, vocab)
    rng = random.Random(0)
    sequences, contexts = [], []
    for length in (2, 5, 17, 9, 30, 3, 12):  # gemma3's sliding window is 8: long ones cross it
        sequences.append([rng.randrange(vocab) for _ in range(length)])
        contexts.append(rng.randrange(1, length))
    got = score_sequences(model, sequences, contexts, batch_size=3, progress=False)
    expected = [slow_nll(model, seq, n) for seq, n in zip(sequences, contexts)]
    assert got == pytest.approx(expected, rel=1e-5)


def test_score_sequences_rejects_bad_input():
    model = ConstantLM(torch.zeros(10))
    with pytest.raises(ValueError, match="context tokens"):
        score_sequences(model, [[1, 2, 3]], [0], progress=False)
    with pytest.raises(ValueError, match="context tokens"):
        score_sequences(model, [[1, 2, 3]], [3], progress=False)
    with pytest.raises(ValueError, match="2 sequences but 1"):
        score_sequences(model, [[1, 2], [3, 4]], [1], progress=False)
    with pytest.raises(ValueError, match="only 10 rows"):
        score_sequences(model, [[1, 10]], [1], progress=False)
    assert score_sequences(model, [], [], progress=False) == []


# --- windows ---------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [1, 6, 7, 8, 23])
@pytest.mark.parametrize("max_length,overlap", [(2, 0), (7, 0), (7, 1), (7, 5), (8, 3)])
def test_windows_score_every_token_exactly_once(length, max_length, overlap):
    ids = list(range(100, 100 + length))
    result = windows(ids, prefix_id=0, max_length=max_length, overlap=overlap)
    scored = []
    for k, (window, n_ctx) in enumerate(result):
        assert window[0] == 0 and len(window) <= max_length
        context = window[1:n_ctx]
        # Context = exactly the `overlap` (or fewer, at the start) tokens right before the scored ones.
        assert context == ids[len(scored) - len(context) : len(scored)]
        assert len(context) == (0 if k == 0 else min(overlap, len(scored)))
        scored.extend(window[n_ctx:])
    assert scored == ids
    if length > max_length - 1:  # all but the last window are full
        assert all(len(window) == max_length for window, _ in result[:-1])


def test_windows_reject_bad_settings():
    with pytest.raises(ValueError, match="max_length"):
        windows([1, 2], 0, max_length=1)
    with pytest.raises(ValueError, match="overlap"):
        windows([1, 2], 0, max_length=4, overlap=3)
    with pytest.raises(ValueError, match="empty"):
        windows([], 0, max_length=4)


# --- bits per byte ---------------------------------------------------------------------------


@pytest.mark.parametrize("max_length,overlap", [(1024, 0), (5, 0), (5, 2)])
def test_bpb_of_uniform_model_is_log2_vocab_times_tokens_per_byte(byte_level_tokenizer, max_length, overlap):
    # The output vocabulary (model) is larger than the tokenizer's: it is the model's that counts.
    vocab = len(byte_level_tokenizer) + 7
    model = tiny_model("qwen3", vocab)  # untied: zeroing the LM head gives exactly uniform logits
    torch.nn.init.zeros_(model.lm_head.weight)
    result = bits_per_byte(model, byte_level_tokenizer, DOCS, max_length=max_length, overlap=overlap,
                           progress=False)
    tokens = sum(len(ids_of(byte_level_tokenizer, doc)) for doc in DOCS)
    assert result.tokens == tokens and result.bytes == utf8_len(DOCS) and result.documents == len(DOCS)
    assert result.bpb == pytest.approx(math.log2(vocab) * tokens / utf8_len(DOCS), rel=1e-6)


def test_bpb_of_a_hand_set_bigram_model(sentencepiece_tokenizer):
    tok = sentencepiece_tokenizer
    table = torch.randn(len(tok), len(tok), generator=torch.Generator().manual_seed(0)) * 3
    model = BigramLM(table)
    prefix = prefix_token_id(tok)
    assert prefix == tok.bos_token_id
    nll = 0.0
    for doc in DOCS:
        ids = ids_of(tok, doc)
        nll += sum(model.nll(prev, token) for prev, token in zip([prefix, *ids[:-1]], ids))
    expected = nll / math.log(2) / utf8_len(DOCS)
    assert bits_per_byte(model, tok, DOCS, progress=False).bpb == pytest.approx(expected, rel=1e-5)

    # Disjoint windows of max_length L: the first token of each window follows the prefix token.
    L = 6
    nll_windowed = 0.0
    for doc in DOCS:
        ids = ids_of(tok, doc)
        for i, token in enumerate(ids):
            prev = prefix if i % (L - 1) == 0 else ids[i - 1]
            nll_windowed += model.nll(prev, token)
    result = bits_per_byte(model, tok, DOCS, max_length=L, progress=False)
    assert result.nll_nats == pytest.approx(nll_windowed, rel=1e-5)
    assert result.nll_nats > nll * 1.01  # the windowed number really differs
    # One token of overlap restores the bigram's whole context: identical to no windowing.
    assert bits_per_byte(model, tok, DOCS, max_length=L, overlap=1, progress=False).nll_nats == pytest.approx(
        nll, rel=1e-5)


def test_bpb_overlap_gives_exactly_that_many_tokens_of_context(byte_level_tokenizer):
    generator = torch.Generator().manual_seed(1)
    vocab = len(byte_level_tokenizer)
    model = TwoTokenLM(torch.randn(vocab, vocab, generator=generator), torch.randn(vocab, vocab, generator=generator))
    full = bits_per_byte(model, byte_level_tokenizer, DOCS, progress=False).nll_nats

    def windowed(overlap):
        return bits_per_byte(model, byte_level_tokenizer, DOCS, max_length=7, overlap=overlap,
                             progress=False).nll_nats

    assert windowed(2) == pytest.approx(full, rel=1e-5)  # the model sees two tokens: enough
    assert windowed(1) != pytest.approx(full, rel=1e-4)  # one is not


@pytest.mark.parametrize("family", FAMILIES)
def test_bpb_does_not_depend_on_batching_or_padding(family, byte_level_tokenizer):
    model = tiny_model(family, len(byte_level_tokenizer))
    one = bits_per_byte(model, byte_level_tokenizer, DOCS, batch_size=1, max_length=24, progress=False)
    four = bits_per_byte(model, byte_level_tokenizer, DOCS, batch_size=4, max_length=24, progress=False)
    assert (one.tokens, one.bytes) == (four.tokens, four.bytes)
    assert four.bpb == pytest.approx(one.bpb, rel=1e-5)


def permuted_tokenizer(tokenizer, seed: int = 0):
    """The same tokenizer with its (non-special) token ids shuffled: same tokens, other ids."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = state["model"]["vocab"]
    special = {token["id"] for token in state["added_tokens"]}
    movable = sorted(i for i in vocab.values() if i not in special)
    shuffled = movable[:]
    random.Random(seed).shuffle(shuffled)
    new_id = dict(zip(movable, shuffled)) | {i: i for i in special}
    state["model"]["vocab"] = {token: new_id[i] for token, i in vocab.items()}
    permuted = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(state)), bos_token="<s>",
                                       eos_token="</s>", pad_token="<pad>")
    return permuted, new_id


@pytest.mark.parametrize("family", ["llama", "qwen3"])  # tied and untied LM head
def test_adapted_model_goes_through_the_same_code(family, byte_level_tokenizer):
    """An adapted model (TransferResult.apply_to) with its tokenizer gives the original's number when
    the transfer is a pure renumbering of the vocabulary."""
    teacher = byte_level_tokenizer
    student, new_id = permuted_tokenizer(teacher)
    assert [student.convert_ids_to_tokens(new_id[i]) for i in ids_of(teacher, DOCS[1])] == \
        teacher.convert_ids_to_tokens(ids_of(teacher, DOCS[1]))
    model = tiny_model(family, len(teacher))
    order = torch.tensor([old for old, _ in sorted(new_id.items(), key=lambda kv: kv[1])])
    inputs = model.get_input_embeddings().weight.detach()[order]
    if family == "llama":
        result = TransferResult(inputs.clone(), tie_word_embeddings=True)
    else:
        outputs = model.get_output_embeddings().weight.detach()[order]
        result = TransferResult(inputs.clone(), outputs.clone(), tie_word_embeddings=False)
    adapted = result.apply_to(copy.deepcopy(model))
    original = bits_per_byte(model, teacher, DOCS, max_length=16, progress=False)
    transferred = bits_per_byte(adapted, student, DOCS, max_length=16, progress=False)
    assert (transferred.tokens, transferred.bytes) == (original.tokens, original.bytes)
    assert transferred.bpb == pytest.approx(original.bpb, rel=1e-5)


def test_bpb_input_errors(byte_level_tokenizer, caplog):
    tok = byte_level_tokenizer
    model = ConstantLM(torch.zeros(len(tok)))
    with pytest.raises(ValueError, match="No non-empty documents"):
        bits_per_byte(model, tok, [], progress=False)
    with pytest.raises(ValueError, match="No non-empty documents"):
        bits_per_byte(model, tok, ["", ""], progress=False)
    with pytest.raises(TypeError, match="not a single string"):
        bits_per_byte(model, tok, "a document", progress=False)
    with pytest.raises(TypeError, match=r"texts\[1\] is int"):
        bits_per_byte(model, tok, ["a", 3], progress=False)
    # Empty documents among others are skipped with a logged count, and change nothing.
    with caplog.at_level(logging.WARNING, logger="matt.evaluation.bpb"):
        with_empty = bits_per_byte(model, tok, ["abc", "", "def"], progress=False)
    assert "Skipping 1 empty document(s) of 3" in caplog.text
    assert with_empty == bits_per_byte(model, tok, ["abc", "def"], progress=False)
    # Token ids the model has no embedding for.
    with pytest.raises(ValueError, match="embedding matrix has only 50 rows"):
        bits_per_byte(ConstantLM(torch.zeros(50)), tok, DOCS, progress=False)


def test_windows_longer_than_the_model_positions_are_refused(byte_level_tokenizer):
    model = tiny_model("gpt_neox", len(byte_level_tokenizer), max_position_embeddings=16)
    with pytest.raises(ValueError, match="max_position_embeddings=16"):
        bits_per_byte(model, byte_level_tokenizer, DOCS, max_length=17, progress=False)
    assert bits_per_byte(model, byte_level_tokenizer, DOCS, max_length=16, progress=False).tokens > 16


def test_prefix_token_falls_back_to_eos_and_fails_without_either():
    tok = hand_bpe_tokenizer(list("abc "))
    assert prefix_token_id(tok) == 0  # BOS
    tok.bos_token = None
    assert prefix_token_id(tok) == 1  # EOS
    model = ConstantLM(torch.zeros(len(tok)))
    assert bits_per_byte(model, tok, ["ab c"], progress=False).bpb == pytest.approx(math.log2(len(tok)))
    tok.eos_token = None
    with pytest.raises(ValueError, match="neither a BOS nor an EOS"):
        bits_per_byte(model, tok, ["ab c"], progress=False)


def test_bpb_result_totals():
    result = BPBResult.from_totals(nll_nats=8 * math.log(2), num_bytes=4, tokens=3, documents=1)
    assert result.bpb == pytest.approx(2.0)
    with pytest.raises(ValueError, match="zero bytes"):
        BPBResult.from_totals(1.0, 0, 1, 1)


# --- unigram floor ---------------------------------------------------------------------------


def test_unigram_counts_smoothing_and_bpb_by_hand():
    tok = hand_bpe_tokenizer(["a", "b", "c", " "])  # ids: <s>=0 </s>=1 <pad>=2 a=3 b=4 c=5 ' '=6
    unigram = UnigramModel.fit(tok, ["aab", "ab c"], smoothing=1.0)
    assert unigram.counts.tolist() == [0, 0, 0, 3, 2, 1, 1]
    # add-1 over 7 vocabulary entries: (count + 1) / (7 tokens + 7)
    assert unigram.log_probs.tolist() == pytest.approx([math.log(x / 14) for x in (1, 1, 1, 4, 3, 2, 2)])
    result = unigram.bits_per_byte(["ba", "cc"])
    nll = -(math.log(3 / 14) + math.log(4 / 14) + 2 * math.log(2 / 14))
    assert (result.tokens, result.bytes, result.documents) == (4, 4, 2)
    assert result.bpb == pytest.approx(nll / math.log(2) / 4)

    half = UnigramModel.fit(tok, ["aab", "ab c"], smoothing=0.5)
    assert half.log_probs[3] == pytest.approx(math.log(3.5 / (7 + 3.5)))
    probs = [x / 14 for x in (1, 1, 1, 4, 3, 2, 2)]
    assert unigram.entropy_bits() == pytest.approx(-sum(p * math.log2(p) for p in probs))


def test_unigram_uses_no_special_tokens_and_rejects_bad_smoothing(byte_level_tokenizer):
    unigram = UnigramModel.fit(byte_level_tokenizer, DOCS)
    assert unigram.counts.sum() == sum(len(ids_of(byte_level_tokenizer, doc)) for doc in DOCS)
    assert unigram.counts[byte_level_tokenizer.bos_token_id] == 0  # the tokenizer adds BOS by default
    with pytest.raises(ValueError, match="smoothing must be > 0"):
        UnigramModel.fit(byte_level_tokenizer, DOCS, smoothing=0)


# --- compression -----------------------------------------------------------------------------


def test_compression_on_hand_countable_text():
    # "ab" is one token; specials (BOS is added by default) are not counted.
    tok = hand_bpe_tokenizer(["a", "b", " ", "ї", "ab"], [("a", "b")], add_bos=True)
    texts = ["ab ab", "ї a"]  # tokens: [ab, ' ', ab] + [ї, ' ', a] = 6; bytes 5 + 4 = 9; chars 8; words 4
    assert len(tok(texts[0])["input_ids"]) == 4
    assert compression(tok, texts) == pytest.approx(
        {"bytes_per_token": 9 / 6, "tokens_per_word": 6 / 4, "chars_per_token": 8 / 6})


def test_bpb_per_document_bits_are_each_documents_own_bits(byte_level_tokenizer):
    """The per-document lists behind the bootstrap interval: each entry is what scoring that document
    alone gives, and they add up to the total."""
    model = tiny_model("llama", len(byte_level_tokenizer))
    both = bits_per_byte(model, byte_level_tokenizer, DOCS, batch_size=2, max_length=24, progress=False)
    assert len(both.document_bits) == len(both.document_bytes) == len(DOCS)
    assert sum(both.document_bits) == pytest.approx(both.nll_nats / math.log(2), rel=1e-9)
    for doc, bits, size in zip(DOCS, both.document_bits, both.document_bytes):
        alone = bits_per_byte(model, byte_level_tokenizer, [doc], batch_size=1, max_length=24, progress=False)
        assert size == alone.bytes == len(doc.encode("utf-8"))
        assert bits == pytest.approx(alone.bpb * alone.bytes, rel=1e-5)
