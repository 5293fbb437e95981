"""Shared helpers of the evaluation tests (no tests here): hand-made LMs and tokenizers.

The fake LMs have the HF causal-LM interface the metrics use (`forward(input_ids, ...).logits`,
`get_input_embeddings()`) but a next-token rule written out by hand, so every metric can be
checked against a value computed independently in the test.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutput

SPECIALS = ["<s>", "</s>", "<pad>"]


class FakeLM(nn.Module):
    """Base: logits come from `next_token_logits(input_ids)` (B, T) -> (B, T, V)."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, 1)  # only for get_input_embeddings() and the device

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, input_ids: torch.Tensor, attention_mask=None, **kwargs) -> CausalLMOutput:
        return CausalLMOutput(logits=self.next_token_logits(input_ids))

    def next_token_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class ConstantLM(FakeLM):
    """The same next-token distribution everywhere (zeros = uniform)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__(len(logits))
        self.register_buffer("logits", logits.float())

    def next_token_logits(self, input_ids):
        return self.logits.expand(*input_ids.shape, -1).clone()

    def log_prob(self, token: int) -> float:
        return float(torch.log_softmax(self.logits.double(), -1)[token])


class BigramLM(FakeLM):
    """p(next | ..., prev) = softmax(table[prev]): sees exactly one token of context."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__(table.shape[0])
        self.register_buffer("table", table.float())

    def next_token_logits(self, input_ids):
        return self.table[input_ids]

    def nll(self, prev: int, token: int) -> float:
        row = self.table[prev].double().tolist()
        return math.log(sum(math.exp(x) for x in row)) - row[token]


class TwoTokenLM(FakeLM):
    """logits(t) = a[x_t] + b[x_{t-1}]: sees exactly two tokens of context."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__(a.shape[0])
        self.register_buffer("a", a.float())
        self.register_buffer("b", b.float())

    def next_token_logits(self, input_ids):
        logits = self.a[input_ids].clone()
        logits[:, 1:] += self.b[input_ids[:, :-1]]
        return logits


class OracleLM(FakeLM):
    """Knows some token sequences: while the input is a prefix of one, it puts ~all mass on the
    next token of that sequence; elsewhere it is uniform."""

    def __init__(self, vocab_size: int, sequences: list[list[int]]) -> None:
        super().__init__(vocab_size)
        self.continuations: dict[tuple[int, ...], set[int]] = {}
        for seq in sequences:
            for t in range(1, len(seq)):
                self.continuations.setdefault(tuple(seq[:t]), set()).add(seq[t])

    def next_token_logits(self, input_ids):
        batch, length = input_ids.shape
        logits = torch.zeros(batch, length, self.vocab_size)
        for row in range(batch):
            ids = input_ids[row].tolist()
            for t in range(length):
                for token in self.continuations.get(tuple(ids[: t + 1]), ()):
                    logits[row, t, token] = 30.0
        return logits


def hand_bpe_tokenizer(tokens: list[str], merges=(), *, byte_level: bool = False, trim_offsets: bool = False,
                       add_bos: bool = False):
    """A BPE tokenizer with a hand-written vocabulary (after the specials <s>=0, </s>=1, <pad>=2).

    Without `byte_level` there is no pre-tokenizer and no merges unless given: every character is
    one token (characters must be in `tokens`). With `byte_level`, `tokens` must contain the
    GPT-2 byte alphabet and `merges` builds bigger tokens, as in GPT-2 / Llama 3.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([*SPECIALS, *tokens])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    tok.add_special_tokens(SPECIALS)
    if byte_level:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        post = [processors.ByteLevel(trim_offsets=trim_offsets)]
    else:
        post = []
    if add_bos:
        post.append(processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)]))
    if post:
        tok.post_processor = processors.Sequence(post)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def gpt2_byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character table: printable Latin-1 bytes stand for themselves,
    the other bytes take the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def byte_alphabet() -> list[str]:
    table = gpt2_byte_chars()
    return [table[byte] for byte in range(256)]


def token_bytes(tokenizer, token_id: int, style: str) -> bytes:
    """The UTF-8 bytes one token stands for, read off its vocabulary string (not via offsets)."""
    token = tokenizer.convert_ids_to_tokens(token_id)
    if style == "byte_level":
        decoder = {char: byte for byte, char in gpt2_byte_chars().items()}
        return bytes(decoder[char] for char in token)
    if token.startswith("<0x") and token.endswith(">") and len(token) == 6:
        return bytes([int(token[3:5], 16)])
    return token.replace("▁", " ").encode("utf-8")
