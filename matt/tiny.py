"""Tiny random models and in-process tokenizers for tests and smoke runs.

Every family's model is built from its real transformers config class (same architecture code
paths as the pretrained checkpoints: GQA, RoPE, Gemma's embedding scale and sliding windows,
Qwen3's untied head, GPT-NeoX's parallel residual), only shrunk. Tokenizers are trained with the
`tokenizers` library in two styles that mirror real checkpoints: byte-level BPE (GPT-2, Llama 3,
SmolLM2, Qwen) and SentencePiece-style BPE with byte fallback (Llama 2, Mistral, Gemma).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch

from matt.modeling.registry import SHIPPED_FAMILIES as FAMILIES

TokenizerStyle = Literal["byte_level", "sentencepiece"]

SAMPLE_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Attention layers move information between tokens; embeddings only start the story.",
    "Привіт, світе! Це короткий український текст для перевірки токенізатора.",
    "Мова — це система знаків, а токенізатор ділить текст на шматки.",
    "Zażółć gęślą jaźń — Polish letters, and some emoji 🙂 too.",
    "Numbers like 3.14159 and 2026-11-22, code like `x = f(y) + 1`, and URLs: https://example.org/a?b=c.",
    "  Leading spaces,\ttabs,\nnew lines\n\nand   repeated   spaces   matter.",
    "Tokenizer transfer keeps what a model knows while changing how text is cut into pieces.",
    "Кожен сегмент закінчується там, де обидва токенізатори мають межу.",
    "A byte-level tokenizer never fails; a sentencepiece one falls back to bytes like <0xE2>.",
]


def tiny_config(
    family: str,
    vocab_size: int,
    *,
    hidden_size: int = 64,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 1024,
    **overrides,
):
    """A shrunken real config of `family` (one of `FAMILIES`, the families MATT ships)."""
    from transformers import Gemma3TextConfig, GPTNeoXConfig, LlamaConfig, MistralConfig, Qwen3Config

    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                  num_attention_heads=num_attention_heads, intermediate_size=intermediate_size,
                  max_position_embeddings=max_position_embeddings, pad_token_id=None, bos_token_id=None,
                  eos_token_id=None)
    head_dim = hidden_size // num_attention_heads
    if family == "llama":
        cfg = LlamaConfig(**common, num_key_value_heads=num_key_value_heads, tie_word_embeddings=True)
    elif family == "mistral":
        cfg = MistralConfig(**common, num_key_value_heads=num_key_value_heads, sliding_window=64,
                            tie_word_embeddings=False)
    elif family == "qwen3":
        cfg = Qwen3Config(**common, num_key_value_heads=num_key_value_heads, head_dim=head_dim,
                          tie_word_embeddings=False)
    elif family == "gemma3":
        cfg = Gemma3TextConfig(**common, num_key_value_heads=num_key_value_heads, head_dim=head_dim,
                               sliding_window=8, query_pre_attn_scalar=head_dim, tie_word_embeddings=True)
    elif family == "gpt_neox":
        cfg = GPTNeoXConfig(**common, tie_word_embeddings=False)
    else:
        raise ValueError(f"No tiny model for family {family!r}; choose one of {list(FAMILIES)}")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def tiny_model(family: str, vocab_size: int, *, seed: int = 0, **config_overrides):
    """A randomly initialised tiny causal LM of `family` (float32, eval mode)."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(family, vocab_size, **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    return model.float().eval()


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 400,
    style: TokenizerStyle = "byte_level",
    *,
    add_bos: bool = True,
):
    """Train a small BPE tokenizer in-process and wrap it as a fast HF tokenizer.

    `byte_level`: GPT-2-style byte alphabet, spaces attached as a leading "Ġ".
    `sentencepiece`: "▁" word prefix, unknown characters fall back to <0xNN> byte tokens.
    Specials: <s> (BOS, prepended when `add_bos`), </s> (EOS), <pad>. The sentencepiece style
    appends the 256 byte tokens after training, so its vocabulary is up to `vocab_size + 256`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from matt.tokenizers import append_byte_tokens

    if style == "byte_level":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(texts, trainer)
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    elif style == "sentencepiece":
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Sequence(
            [decoders.Metaspace(replacement="▁", prepend_scheme="first"), decoders.ByteFallback(), decoders.Fuse()]
        )
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                      show_progress=False)
        tok.train_from_iterator(texts, trainer)
        tok = append_byte_tokens(tok)  # as Llama/Gemma: the 256 <0xNN> tokens after the trained ones
    else:
        raise ValueError(f"Unknown tokenizer style {style!r}; choose 'byte_level' or 'sentencepiece'")

    if add_bos:
        template = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                 special_tokens=[("<s>", tok.token_to_id("<s>"))])
        if style == "byte_level":
            tok.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False), template])
        else:
            tok.post_processor = template
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>" if style == "sentencepiece" else None, add_bos_token=add_bos)
