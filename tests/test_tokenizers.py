"""Student tokenizers: trained like the teacher (vocabulary replacement) or the teacher extended."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from matt.tokenizers import (BYTE_TOKENS, extend_tokenizer, learn_continued_merges, teacher_token_runs,
                             train_tokenizer_like)

PIPELINE = ("normalizer", "pre_tokenizer", "post_processor", "decoder")
TEACHER_STYLES = {"llama3": 600, "gpt2": 600, "qwen": 600, "llama2": 300, "gemma": 300, "mistral_eos": 300,
                  "unigram": 200}


@pytest.fixture(scope="module")
def teachers(text_tools, style_corpus):
    return {name: text_tools.build(name, style_corpus, size) for name, size in TEACHER_STYLES.items()}


@pytest.fixture(scope="module")
def target_texts(text_tools):
    """Target-language text: mostly Ukrainian, other words than the teachers saw most."""
    rng = random.Random(21)
    words = ["розуміння", "перекладач", "словник", "вчителька", "прислів'я", "держава", "щоденник", "ґудзик",
             "їжачок", "з'їзд", "Львів", "Харків", "вечеря", "бджола", "світ", "мова", "текст"]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 14))) for _ in range(150)]
    return texts + text_tools.training_corpus(seed=4, n=40)


def state(tokenizer) -> dict:
    return json.loads(tokenizer.backend_tokenizer.to_str())


def assert_same_pipeline_and_specials(teacher, student, texts):
    t_state, s_state = state(teacher), state(student)
    for part in PIPELINE:
        assert t_state[part] == s_state[part], part
    assert student.special_tokens_map == teacher.special_tokens_map
    backend_t, backend_s = teacher.backend_tokenizer, student.backend_tokenizer
    for text in texts:
        normalized = backend_t.normalizer.normalize_str(text) if backend_t.normalizer else text
        if backend_t.pre_tokenizer is not None:
            assert backend_s.pre_tokenizer.pre_tokenize_str(normalized) == \
                backend_t.pre_tokenizer.pre_tokenize_str(normalized)
        # the same special tokens around the text, with the student's own ids
        assert added_specials(student, text) == added_specials(teacher, text), text


def added_specials(tokenizer, text: str) -> list[str]:
    """The special tokens the tokenizer puts around `text` (BOS/EOS), in order."""
    enc = tokenizer(text, return_special_tokens_mask=True)
    return [tokenizer.convert_ids_to_tokens(i) for i, m in zip(enc["input_ids"], enc["special_tokens_mask"]) if m]


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
@pytest.mark.parametrize("teacher_name", list(TEACHER_STYLES))
def test_train_tokenizer_like_keeps_pipeline_and_specials(teachers, target_texts, text_tools, teacher_name, kind):
    teacher = teachers[teacher_name]
    vocab_size = 700 if teacher_name in ("llama3", "gpt2", "qwen") else 450
    student = train_tokenizer_like(teacher, target_texts, vocab_size, kind=kind)
    assert state(student)["model"]["type"] == {"bpe": "BPE", "unigram": "Unigram"}[kind]
    assert len(student) <= vocab_size
    assert_ids_unique_and_dense(student)
    rng = random.Random(0)
    samples = [text_tools.random_text(rng) for _ in range(15)] + target_texts[:5]
    assert_same_pipeline_and_specials(teacher, student, samples)
    for special in ("bos", "eos", "pad", "unk"):
        token = getattr(teacher, f"{special}_token")
        if token is not None:
            assert student.convert_ids_to_tokens(getattr(student, f"{special}_token_id")) == token
    # the student really learned the target language: fewer tokens than the teacher on it
    t_count = sum(len(teacher(t)["input_ids"]) for t in target_texts[:100])
    s_count = sum(len(student(t)["input_ids"]) for t in target_texts[:100])
    assert s_count < t_count
    byte_fallback = state(teacher)["model"].get("byte_fallback", False)
    if byte_fallback:
        vocab = student.get_vocab()
        assert all(token in vocab for token in BYTE_TOKENS)
        assert state(student)["model"]["byte_fallback"]
    unseen = "漢字 🦄"
    tokens = student.convert_ids_to_tokens(student(unseen)["input_ids"])
    assert student.unk_token is None or student.unk_token not in tokens  # bytes, never <unk>
    assert student.decode(student(unseen, add_special_tokens=False)["input_ids"]).strip() == unseen


def test_train_tokenizer_like_bad_inputs(teachers, target_texts):
    with pytest.raises(ValueError, match="leaves no room"):
        train_tokenizer_like(teachers["llama2"], target_texts, 200)  # < 256 byte tokens + specials
    with pytest.raises(ValueError, match="non-empty"):
        train_tokenizer_like(teachers["llama3"], ["", ""], 400)
    with pytest.raises(ValueError, match="kind"):
        train_tokenizer_like(teachers["llama3"], target_texts, 400, kind="wordpiece")


@pytest.mark.parametrize("teacher_name", ["llama3", "gpt2", "qwen", "llama2", "gemma", "mistral_eos"])
def test_extend_tokenizer(teachers, target_texts, text_tools, teacher_name, tmp_path):
    from transformers import AutoTokenizer

    teacher = teachers[teacher_name]
    num_new = 40
    extended = extend_tokenizer(teacher, target_texts, num_new)
    # every teacher token keeps its id; exactly num_new tokens are appended after them
    ext_vocab = extended.get_vocab()
    for token, idx in teacher.get_vocab().items():
        assert ext_vocab[token] == idx, token
    assert len(extended) == len(teacher) + num_new
    assert sorted(i for t, i in ext_vocab.items() if t not in teacher.get_vocab()) == \
        list(range(len(teacher), len(teacher) + num_new))
    assert_ids_unique_and_dense(extended)
    assert_same_pipeline_and_specials(teacher, extended, target_texts[:5])
    # never more tokens than the teacher, on any text; fewer on the target language
    rng = random.Random(5)
    texts = [text_tools.random_text(rng) for _ in range(60)] + target_texts
    t_total = e_total = 0
    for text in texts:
        t_ids, e_ids = teacher(text)["input_ids"], extended(text)["input_ids"]
        assert len(e_ids) <= len(t_ids), text
        assert extended.decode(e_ids) == teacher.decode(t_ids)
        t_total, e_total = t_total + len(t_ids), e_total + len(e_ids)
    assert e_total < 0.95 * t_total
    # the result round-trips through save_pretrained / AutoTokenizer
    extended.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(loaded) == len(extended) and loaded.is_fast
    for text in texts[:20]:
        assert loaded(text, return_offsets_mapping=True) == extended(text, return_offsets_mapping=True), text


@pytest.mark.parametrize("teacher_name", ["gpt2", "qwen", "llama2", "gemma", "mistral_eos"])
def test_extended_tokenizer_encodes_as_the_merges_were_learned(teachers, target_texts, teacher_name):
    """The extension continues BPE from the teacher's segmentation, so the extended tokenizer must
    reproduce the learned segmentation exactly and actually use its new tokens on the target text."""
    teacher = teachers[teacher_name]
    runs = teacher_token_runs(teacher, target_texts)
    merges, new_tokens, learned = learn_continued_merges(runs, set(teacher.get_vocab()), 40)
    extended = extend_tokenizer(teacher, target_texts, 40)
    assert [extended.convert_ids_to_tokens(i) for i in range(len(teacher), len(extended))] == new_tokens
    produced = Counter()
    for text in target_texts:
        produced.update(extended.convert_ids_to_tokens(extended(text, add_special_tokens=False)["input_ids"]))
    learned_counts = Counter()
    for run, freq in learned.items():
        for token in run:
            learned_counts[token] += freq
    for token in new_tokens:
        assert produced[token] == learned_counts[token], token
    # a new token is produced on the target text, or a later merge consumed it (as in any BPE)
    parts = {part for merge in merges for part in merge}
    assert all(produced[token] > 0 or token in parts for token in new_tokens)
    assert sum(produced[token] for token in new_tokens) > 0


def test_extend_tokenizer_keeps_the_teachers_lone_digits(teachers, target_texts, text_tools, style_corpus):
    """A teacher that never joins an ASCII digit with anything (Gemma, SmolLM2) keeps numbers digit by
    digit after the extension; one that has multi-digit tokens may get more of them."""
    import re

    from matt.tokenizers import _keeps_digits_alone

    digitless = [re.sub("[0-9]", "", text) for text in style_corpus]
    candidates = {name: teachers[name] for name in ("gpt2", "llama3", "llama2")}
    for name in ("gemma", "gpt2"):  # trained on text without digits: digits stay single bytes/chars
        candidates[f"{name}_lone_digits"] = text_tools.build(name, digitless, TEACHER_STYLES[name])
    numbers = [f"рік 2023, сторінка {n} з 12345" for n in range(10, 90)]
    seen_lone = seen_joined = False
    for name, teacher in candidates.items():
        extended = extend_tokenizer(teacher, target_texts + numbers * 3, 60)
        new = [extended.convert_ids_to_tokens(i) for i in range(len(teacher), len(extended))]
        if _keeps_digits_alone(teacher):
            seen_lone = True
            assert not [t for t in new if re.search("[0-9]", t)], name
        else:
            seen_joined = True
    assert seen_lone and seen_joined, "the fixture teachers no longer cover both cases"


def test_learn_continued_merges_against_a_literal_bpe_loop():
    """Each step merges the most frequent pair (ties: smallest pair) everywhere; a pair that would
    spell a known token is never merged; counts below min_frequency stop the loop."""
    runs = Counter({("a", "b", "c"): 5, ("a", "b"): 2, ("b", "c", "b", "c"): 3, ("x", "y"): 1, ("c", "d"): 4})
    known = {"a", "b", "c", "d", "x", "y", "cd"}

    def literal(runs, known, num_new, min_frequency):
        words = {tuple(k): v for k, v in runs.items()}
        merges, new = [], []
        banned = set()
        while len(new) < num_new:
            counts = Counter()
            for word, freq in words.items():
                for pair in zip(word, word[1:]):
                    if pair not in banned:
                        counts[pair] += freq
            if not counts:
                break
            best = min(counts, key=lambda p: (-counts[p], p))
            if counts[best] < min_frequency:
                break
            if best[0] + best[1] in known:
                banned.add(best)
                continue
            merges.append(best)
            if best[0] + best[1] not in new:
                new.append(best[0] + best[1])
            merged_words = Counter()
            for word, freq in words.items():
                out, j = [], 0
                while j < len(word):
                    if j + 1 < len(word) and (word[j], word[j + 1]) == best:
                        out.append(word[j] + word[j + 1])
                        j += 2
                    else:
                        out.append(word[j])
                        j += 1
                merged_words[tuple(out)] += freq
            words = merged_words
        return merges, new, Counter(words)

    for num_new, min_frequency in ((1, 1), (3, 2), (10, 2), (10, 1), (10, 6)):
        got = learn_continued_merges(runs, known, num_new, min_frequency)
        assert got == literal(runs, known, num_new, min_frequency), (num_new, min_frequency)
    merges, new, _ = learn_continued_merges(runs, known, 10, 2)
    assert ("c", "d") not in merges and "cd" not in new  # spells a known token
    assert ("x", "y") not in merges  # occurs once only


def with_added_tokens(tokenizer):
    """A copy with tokens added after the model vocabulary, as real checkpoints have them (Llama 3's
    reserved specials, Qwen's chat markers): two extra specials, a special marker and a plain one."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    copy = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer.backend_tokenizer.to_str()),
                                   **tokenizer.special_tokens_map)
    copy.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    copy.add_tokens(["<|marker|>"], special_tokens=True)
    copy.add_tokens(["<code>"])
    model_size = copy.backend_tokenizer.get_vocab_size(with_added_tokens=False)
    assert copy.convert_tokens_to_ids("<code>") == model_size + 3  # really beyond the model vocabulary
    return copy


def assert_ids_unique_and_dense(tokenizer):
    ids = sorted(tokenizer.get_vocab().values())
    assert ids == list(range(len(tokenizer))), "token ids collide or leave holes"
    for idx in range(len(tokenizer)):  # every id decodes to the token that owns it
        assert tokenizer.convert_tokens_to_ids(tokenizer.convert_ids_to_tokens(idx)) == idx


@pytest.mark.parametrize("teacher_name", ["llama3", "llama2"])
def test_extend_tokenizer_keeps_added_tokens_beyond_the_model_vocabulary(teachers, target_texts, teacher_name,
                                                                       tmp_path):
    from transformers import AutoTokenizer

    teacher = with_added_tokens(teachers[teacher_name])
    extended = extend_tokenizer(teacher, target_texts, 30)
    assert_ids_unique_and_dense(extended)
    ext_vocab = extended.get_vocab()
    for token, idx in teacher.get_vocab().items():
        assert ext_vocab[token] == idx, token
    assert len(extended) == len(teacher) + 30
    text = "a <|marker|> b <|im_start|>світ<code>"
    assert extended.decode(extended(text)["input_ids"]) == teacher.decode(teacher(text)["input_ids"])
    assert len(extended(text)["input_ids"]) <= len(teacher(text)["input_ids"])
    assert set(extended.all_special_tokens) == set(teacher.all_special_tokens)
    extended.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == ext_vocab
    assert loaded(text, return_offsets_mapping=True) == extended(text, return_offsets_mapping=True)


def test_train_tokenizer_like_with_added_tokens(teachers, target_texts):
    teacher = with_added_tokens(teachers["mistral_eos"])
    student = train_tokenizer_like(teacher, target_texts, 500)
    assert_ids_unique_and_dense(student)
    assert set(student.all_special_tokens) == set(teacher.all_special_tokens)
    for token in ("<|marker|>", "<code>", "<|im_start|>"):
        assert student.convert_tokens_to_ids(token) is not None
        ids = student(f"x {token} y", add_special_tokens=False)["input_ids"]
        assert student.convert_ids_to_tokens(ids).count(token) == 1


def test_extend_tokenizer_respects_num_new_tokens(teachers, target_texts):
    teacher = teachers["llama3"]
    for num_new in (1, 7):
        assert len(extend_tokenizer(teacher, target_texts, num_new)) == len(teacher) + num_new
    with pytest.raises(ValueError, match="num_new_tokens"):
        extend_tokenizer(teacher, target_texts, 0)
    with pytest.raises(ValueError, match="BPE teachers only"):
        extend_tokenizer(teachers["unigram"], target_texts, 10)


def test_train_like_round_trips_through_save_pretrained(teachers, target_texts, tmp_path):
    from transformers import AutoTokenizer

    for name in ("llama3", "mistral_eos", "gpt2"):
        student = train_tokenizer_like(teachers[name], target_texts, 500 if name == "mistral_eos" else 700)
        student.save_pretrained(tmp_path / name)
        loaded = AutoTokenizer.from_pretrained(tmp_path / name)
        for text in target_texts[:5] + ["  Hello 漢字 🙂 \n"]:
            assert loaded(text, return_offsets_mapping=True) == student(text, return_offsets_mapping=True), (name, text)
