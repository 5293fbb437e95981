"""Log-likelihood of token sequences under a causal LM: the one primitive behind BPB and choice scoring.

Every metric that compares models across tokenizers reduces to "sum of next-token negative
log-likelihoods (nats) over some tokens, given the tokens before them". This module computes
exactly that, batched with right padding, and nothing else; the callers decide which tokens are
scored and how many UTF-8 bytes they cover.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


def prefix_token_id(tokenizer) -> int:
    """The single token every scored text is conditioned on: BOS, else EOS.

    A causal LM cannot predict the first token of a text from nothing, so each text (and each
    window of a long text) starts after this token; that way every text token gets a score and
    models with different tokenizers score the same text.
    """
    for name in ("bos_token_id", "eos_token_id"):
        token_id = getattr(tokenizer, name, None)
        if token_id is not None:
            return int(token_id)
    raise ValueError(
        "The tokenizer has neither a BOS nor an EOS token, so the first token of a text cannot be "
        "conditioned on anything; set tokenizer.bos_token (or eos_token) before evaluating."
    )


def require_fast_tokenizer(tokenizer) -> None:
    """Offsets (character spans of tokens) need a Rust-backed tokenizer."""
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"{type(tokenizer).__name__} is not a fast (Rust-backed) tokenizer; evaluation needs "
            "character offsets. Load it with AutoTokenizer.from_pretrained(..., use_fast=True)."
        )


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (where inputs must go)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def input_vocab_size(model: torch.nn.Module) -> int:
    """Rows of the input embedding matrix: every token id fed to the model must be below this."""
    return int(model.get_input_embeddings().num_embeddings)


def check_ids_fit_model(model: torch.nn.Module, max_id: int, what: str = "token") -> None:
    """Fail with a readable message instead of an index error deep inside the embedding layer."""
    vocab = input_vocab_size(model)
    if max_id >= vocab:
        raise ValueError(
            f"The tokenizer produced {what} id {max_id}, but the model's embedding matrix has only "
            f"{vocab} rows: the model and tokenizer do not belong together (resize the model's "
            "embeddings or pass the matching tokenizer)."
        )


def check_max_length(model: torch.nn.Module, max_length: int) -> None:
    """Refuse windows longer than the positions the model was built for (a clear error instead of
    an index error in a position table, or silently degraded scores past a RoPE model's range)."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and max_length > limit:
        raise ValueError(
            f"max_length={max_length} is longer than the model's max_position_embeddings={limit}; "
            "lower max_length."
        )


@contextlib.contextmanager
def evaluation_mode(model: torch.nn.Module) -> Iterator[None]:
    """Run in eval mode (no dropout) and without autograd, then restore the caller's mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def score_sequences(
    model: torch.nn.Module,
    sequences: Sequence[Sequence[int]],
    num_context: Sequence[int],
    *,
    batch_size: int = 4,
    device: torch.device | str | None = None,
    progress: bool = True,
    desc: str = "scoring",
) -> list[float]:
    """Summed next-token NLL (nats) of `seq[num_context:]` given everything before, per sequence.

    `num_context[i] >= 1` leading tokens of sequence i are conditioning only; each later token t
    contributes -log p(seq[t] | seq[:t]). Sequences are sorted by length and right-padded into
    batches (padding never influences real positions of a causal model); results come back in the
    input order. Log-softmax runs in float32 one row at a time, so a large vocabulary does not
    need a second full-size copy of the logits; the model's own logits still take
    batch_size x longest sequence x vocabulary floats (4 x 1024 x 262k ≈ 4 GiB in float32 for
    Gemma 3), so choose `batch_size` with the vocabulary in mind.
    """
    if len(sequences) != len(num_context):
        raise ValueError(f"Got {len(sequences)} sequences but {len(num_context)} context lengths")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for i, (seq, n_ctx) in enumerate(zip(sequences, num_context)):
        if not 1 <= n_ctx < len(seq):
            raise ValueError(
                f"Sequence {i} has {len(seq)} tokens and {n_ctx} context tokens; need at least one "
                "context token and one scored token."
            )
    if not sequences:
        return []
    check_ids_fit_model(model, max(max(seq) for seq in sequences))
    device = torch.device(device) if device is not None else model_device(model)

    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]), reverse=True)
    nll = [0.0] * len(sequences)
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    with evaluation_mode(model):
        for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
            width = len(sequences[batch[0]])
            input_ids = torch.zeros(len(batch), width, dtype=torch.long)
            attention_mask = torch.zeros(len(batch), width, dtype=torch.long)
            for row, index in enumerate(batch):
                seq = sequences[index]
                input_ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
                attention_mask[row, : len(seq)] = 1
            logits = model(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False
            ).logits
            for row, index in enumerate(batch):
                seq = sequences[index]
                start = num_context[index]
                # logits at position t predict token t + 1.
                row_logits = logits[row, start - 1 : len(seq) - 1].float()
                targets = input_ids[row, start : len(seq)].to(row_logits.device)
                nll[index] = float(F.cross_entropy(row_logits, targets, reduction="sum"))
    return nll
