"""Shared fixtures: tokenizers trained in-process and tiny random models of every family."""

from __future__ import annotations

import pytest

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
