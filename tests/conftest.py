"""Shared fixtures: tokenizers trained in-process and tiny random models of every family."""

from __future__ import annotations

import pytest

from matt.modeling import registry
from matt.tiny import FAMILIES, SAMPLE_TEXTS, tiny_model, train_tokenizer


@pytest.fixture(scope="session")
def sample_texts() -> list[str]:
    return list(SAMPLE_TEXTS)


@pytest.fixture(scope="session")
def byte_level_tokenizer():
    """Teacher-like tokenizer (GPT-2 / Llama-3 / SmolLM2 style)."""
    return train_tokenizer(SAMPLE_TEXTS * 4, vocab_size=400, style="byte_level")


@pytest.fixture(scope="session")
def small_byte_level_tokenizer():
    """A second, coarser-or-finer byte-level tokenizer: a different segmentation of the same text."""
    return train_tokenizer(SAMPLE_TEXTS[::-1] * 2, vocab_size=300, style="byte_level", add_bos=False)


@pytest.fixture(scope="session")
def sentencepiece_tokenizer():
    """Student-like tokenizer (Llama-2 / Mistral / Gemma style with byte fallback)."""
    return train_tokenizer(SAMPLE_TEXTS * 4, vocab_size=350, style="sentencepiece")


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def make_tiny_model():
    return tiny_model


@pytest.fixture
def saved_families():
    """`matt.modeling.registry.FAMILIES`, restored after the test (which may register adapters)."""
    saved = dict(registry.FAMILIES)
    yield registry.FAMILIES
    registry.FAMILIES.clear()
    registry.FAMILIES.update(saved)


# ------------------------------------------------------------------------------------------------
# Tokenizer styles of real checkpoints, trained in-process (segmentation / overlap / data tests)
# ------------------------------------------------------------------------------------------------
import json
import random
import types

WORDS = [
    # Ukrainian
    "Привіт", "світ", "світе", "мова", "токенізатор", "український", "текст", "ґанок", "їжак", "є",
    "Київ", "сегмент", "межа", "обидва", "знаків", "шматки", "перевірка", "моделі", "знає",
    # English
    "the", "quick", "brown", "fox", "transfer", "learning", "tokenizer", "attention", "embeddings",
    "don't", "It's", "model", "Hello", "world", "segments",
    # Polish
    "Zażółć", "gęślą", "jaźń", "źdźbło", "chrząszcz", "brzmi", "w", "trzcinie",
    # emoji, digits, punctuation, code
    "🙂", "🚀", "👨‍👩‍👧", "🇺🇦", "❤️", "3.14159", "2026", "42", "1,000", "007",
    ",", ".", "!", "?", "—", "«", "»", "(", ")", "...", "`x = f(y)`", "https://example.org/a?b=c", "#tag",
]
RARE_WORDS = ["漢字", "🦄", "<s>", "e\u0301", "ß", "Ω", "ÿ", "\u200b", "Ǆ", "𝔘𝔫𝔦", "ﬁne", "Ⅻ", "ｈｅｌｌｏ"]
"""Never in the training corpus: unknown words, byte fallback, byte-level pieces of 3-4 byte chars,
a special token written in the text."""
SEPARATORS = [" ", " ", " ", " ", "  ", "\t", "\n", "\n\n", " \n ", "\r\n", "", "\u00a0", "   "]


def random_text(rng: random.Random, *, rare: bool = True, max_words: int = 18) -> str:
    """Words from `WORDS` (and `RARE_WORDS`) joined by assorted whitespace, maybe padded with it."""
    pool = WORDS + RARE_WORDS if rare else WORDS
    words = [rng.choice(pool) for _ in range(rng.randint(1, max_words))]
    text = words[0]
    for word in words[1:]:
        text += rng.choice(SEPARATORS) + word
    if rng.random() < 0.3:
        text = rng.choice(SEPARATORS[:10]) + text
    if rng.random() < 0.3:
        text = text + rng.choice(SEPARATORS[:10])
    return text


def training_corpus(seed: int = 0, n: int = 300) -> list[str]:
    """Sentences of the common words (no rare ones), plus the tiny models' sample texts."""
    from matt.tiny import SAMPLE_TEXTS

    rng = random.Random(seed)
    return [random_text(rng, rare=False) for _ in range(n)] + list(SAMPLE_TEXTS)


QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
STYLES = ("gpt2", "llama3", "bytelevel_trim_bos", "qwen", "bytelevel_prefix", "llama2", "llama2_legacy",
          "mistral_eos", "gemma", "unigram", "wordlevel", "char_spaces", "nfkc_lower")
"""gpt2: byte-level BPE, trim_offsets=True, no BOS. llama3: byte-level, ignore_merges, BOS, untrimmed.
bytelevel_trim_bos: SmolLM2-like byte-level with trimmed offsets and BOS. qwen: Split regex +
ByteLevel(use_regex=False), digits one by one. bytelevel_prefix: add_prefix_space=True.
llama2 / mistral_eos: Metaspace(prepend first) + byte-fallback BPE, BOS (and EOS). llama2_legacy: the
older normalizer Prepend("▁") + Replace(" ", "▁") without pre-tokenizer. gemma: Replace(" ", "▁")
normalizer, no pre-tokenizer (tokens may span words and carry trailing "▁"), byte fallback.
unigram: Metaspace(prepend always) + byte-fallback Unigram, EOS appended. wordlevel: whole words,
<unk> for unseen ones. char_spaces: one token per character, each whitespace character its own
token, byte fallback for unseen characters. nfkc_lower: NFKC + lowercase normalizer (offsets map
ligatures, "Ⅻ" -> "xii", composed accents back to the original characters), Metaspace, byte fallback."""


def _with_byte_tokens(tok):
    """Append the 256 <0xNN> tokens (trainers never learn them) and switch byte fallback on."""
    from tokenizers import Tokenizer

    state = json.loads(tok.to_str())
    model = state["model"]
    model["byte_fallback"] = True
    if model["type"] == "BPE":
        vocab = model["vocab"]
        for b in range(256):
            vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    else:
        floor = min(score for _, score in model["vocab"]) - 10.0
        model["vocab"] += [[f"<0x{b:02X}>", floor] for b in range(256)]
    return Tokenizer.from_str(json.dumps(state))


def build_style_tokenizer(style: str, texts: list[str], vocab_size: int):
    """A fast HF tokenizer of `style` (see `STYLES`) trained on `texts`; specials <s>, </s>, <pad> (<unk>)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "</s>", "<pad>"]
    unk = None
    bos_template = None
    post = []
    if style in ("gpt2", "llama3", "bytelevel_trim_bos", "qwen", "bytelevel_prefix"):
        tok = Tokenizer(models.BPE(ignore_merges=style == "llama3"))
        if style == "qwen":
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ])
        else:
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=style == "bytelevel_prefix", use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer)
        trim = style in ("gpt2", "bytelevel_trim_bos", "bytelevel_prefix")
        post = [processors.ByteLevel(trim_offsets=trim, add_prefix_space=style == "bytelevel_prefix")]
        bos_template = "<s> $A" if style in ("llama3", "bytelevel_trim_bos") else None
    elif style in ("llama2", "mistral_eos", "llama2_legacy", "gemma", "nfkc_lower"):
        unk = "<unk>"
        tok = Tokenizer(models.BPE(unk_token=unk, byte_fallback=True))
        if style == "nfkc_lower":
            tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
            tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        elif style == "llama2_legacy":
            tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        elif style == "gemma":
            tok.normalizer = normalizers.Replace(" ", "▁")
        else:
            tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
        tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[unk, *specials],
                                                           show_progress=False))
        tok = _with_byte_tokens(tok)
        bos_template = "<s> $A </s>" if style == "mistral_eos" else "<s> $A"
    elif style == "unigram":
        unk = "<unk>"
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tok.decoder = decoders.Sequence([decoders.Metaspace(replacement="▁", prepend_scheme="always"),
                                         decoders.ByteFallback(), decoders.Fuse()])
        tok.train_from_iterator(texts, trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=[unk, *specials],
                                                               unk_token=unk, show_progress=False))
        tok = _with_byte_tokens(tok)
        bos_template = "$A </s>"
    elif style == "wordlevel":
        unk = "<unk>"
        tok = Tokenizer(models.WordLevel(unk_token=unk))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=[unk, *specials],
                                                                 show_progress=False))
    elif style == "char_spaces":
        unk = "<unk>"
        tok = Tokenizer(models.BPE(unk_token=unk, byte_fallback=True))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s"), behavior="isolated")
        tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1, special_tokens=[unk, *specials],
                                                           show_progress=False))
        tok = _with_byte_tokens(tok)
    else:
        raise ValueError(f"unknown style {style!r}")
    if bos_template is not None:
        ids = [(t, tok.token_to_id(t)) for t in ("<s>", "</s>") if t in bos_template.split()]
        post.append(processors.TemplateProcessing(single=bos_template, pair=f"{bos_template} $B", special_tokens=ids))
    if post:
        tok.post_processor = post[0] if len(post) == 1 else processors.Sequence(post)
    # no add_bos_token/add_eos_token: transformers 5 would replace the post-processor built above
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token=unk)


@pytest.fixture(scope="session")
def style_corpus() -> list[str]:
    return training_corpus()


@pytest.fixture(scope="session")
def tokenizer_zoo(style_corpus) -> dict[str, object]:
    """Every style of `STYLES`, plus a few smaller vocabularies of the same style on other text."""
    sizes = {"gpt2": 700, "llama3": 900, "bytelevel_trim_bos": 600, "qwen": 800, "bytelevel_prefix": 650,
             "llama2": 300, "llama2_legacy": 260, "mistral_eos": 250, "gemma": 320, "unigram": 200,
             "wordlevel": 70, "char_spaces": 1, "nfkc_lower": 250}
    zoo = {style: build_style_tokenizer(style, style_corpus, size) for style, size in sizes.items()}
    other = training_corpus(seed=1, n=120)
    zoo["llama3@small"] = build_style_tokenizer("llama3", other, 450)
    zoo["llama2@small"] = build_style_tokenizer("llama2", other, 120)
    zoo["unigram@small"] = build_style_tokenizer("unigram", other, 150)
    return zoo


@pytest.fixture(scope="session")
def text_tools():
    """Helpers shared by the test modules (random texts, corpus, style builder)."""
    return types.SimpleNamespace(random_text=random_text, training_corpus=training_corpus,
                                 build=build_style_tokenizer, words=WORDS, rare_words=RARE_WORDS)
