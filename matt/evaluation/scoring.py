"""Log-likelihood of token sequences under a causal LM: the one primitive behind BPB and choice scoring.

Every metric that compares models across tokenizers reduces to "next-token negative
log-likelihoods (nats) of some tokens, given the tokens before them". This module computes exactly
that and nothing else; the callers decide which tokens are scored and how many UTF-8 bytes they
cover. Throughput: sequences are batched by length, the vocabulary projection runs only on the
scored positions (hidden states -> output layer, in chunks), and `score_continuations` runs a
shared context once for all its continuations (key/value cache).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import weakref
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel

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
    raise ValueError("The tokenizer has neither a BOS nor an EOS token, so the first token of a text cannot be "
                     "conditioned on anything; set tokenizer.bos_token (or eos_token) before evaluating.")


def require_fast_tokenizer(tokenizer) -> None:
    """Offsets (character spans of tokens) need a Rust-backed tokenizer."""
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"{type(tokenizer).__name__} is not a fast (Rust-backed) tokenizer; evaluation needs "
                        "character offsets. Load it with AutoTokenizer.from_pretrained(..., use_fast=True).")


def model_device(model: torch.nn.Module, device: torch.device | str | None = None) -> torch.device:
    """`device` if given, else the device of the model's input embeddings (where inputs must go)."""
    return torch.device(device) if device is not None else model.get_input_embeddings().weight.device


def text_config(model: torch.nn.Module):
    """The model's (text) config, or None for a plain module."""
    config = getattr(model, "config", None)
    return None if config is None else config.get_text_config()


def check_ids_fit_model(model: torch.nn.Module, max_id: int) -> None:
    """Fail with a readable message instead of an index error deep inside the embedding layer."""
    vocab = model.get_input_embeddings().num_embeddings
    if max_id >= vocab:
        raise ValueError(f"The tokenizer produced token id {max_id}, but the model's embedding matrix has only "
                         f"{vocab} rows: the model and tokenizer do not belong together (resize the model's "
                         "embeddings or pass the matching tokenizer).")


def check_max_length(model: torch.nn.Module, max_length: int) -> None:
    """Refuse windows longer than the positions the model was built for (a clear error instead of
    an index error in a position table, or silently degraded scores past a RoPE model's range)."""
    limit = getattr(text_config(model), "max_position_embeddings", None)
    if isinstance(limit, int) and max_length > limit:
        raise ValueError(f"max_length={max_length} is longer than the model's max_position_embeddings={limit}; "
                         "lower max_length.")


@contextlib.contextmanager
def evaluation_mode(model: torch.nn.Module) -> Iterator[None]:
    """Run in eval mode (no dropout) and without autograd, then restore the caller's mode.

    `torch.no_grad`, not `torch.inference_mode`: under inference mode autocast does not cache its
    low-precision weight copies, so with `eval.precision=bf16` every call re-cast every weight
    (Gemma 3's 262K x 640 output layer: ~110 ms per call on CPU, more than its matmul)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


# ------------------------------------------------------------------------------------------------
# logits only where they are scored
# ------------------------------------------------------------------------------------------------
LOGIT_ELEMENTS_PER_CHUNK = 1 << 25
"""Logit rows are projected and normalised in chunks of about this many floats (128 MiB in
float32: 128 rows of Gemma 3's 262K vocabulary), so no (tokens x vocabulary) tensor exists at once."""


def has_separate_head(model: torch.nn.Module) -> bool:
    """True for a transformers causal LM whose backbone (`base_model`) and output layer
    (`get_output_embeddings()`) can be called apart: then hidden states are computed for every
    position and the vocabulary projection only for the scored ones. Anything else (e.g. a plain
    `nn.Module` with a `forward(input_ids).logits`) is scored through its full logits."""
    return (isinstance(model, PreTrainedModel) and model.get_output_embeddings() is not None
            and model.base_model is not model)


def head_logits(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """float32 logits of final hidden states `hidden` (..., H): the output layer plus the final
    logit soft-capping some families (Gemma 2/3) apply in their forward."""
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(text_config(model), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


_HEAD_CHECKED: "weakref.WeakKeyDictionary[torch.nn.Module, bool]" = weakref.WeakKeyDictionary()


def check_head_matches_forward(model: torch.nn.Module, token_ids: Sequence[int]) -> None:
    """Once per model: `head_logits(base_model(ids))` must equal `model(ids).logits`.

    Families that post-process logits in other ways (a logit scale, a bias) would otherwise be
    scored silently wrong by the scored-positions-only path; this fails loudly instead.
    """
    if _HEAD_CHECKED.get(model):
        return
    ids = torch.as_tensor([list(token_ids)[:8]], dtype=torch.long, device=model_device(model))
    reference = model(input_ids=ids, use_cache=False).logits.float()
    hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
    mine = head_logits(model, hidden)
    if not torch.allclose(mine, reference, rtol=1e-3, atol=1e-3 * float(reference.abs().max()) + 1e-4):
        raise NotImplementedError(
            f"{type(model).__name__}: the output layer applied to the backbone's hidden states does not reproduce "
            "the model's logits (an unsupported logit post-processing); evaluation cannot score it on the "
            "scored positions only.")
    _HEAD_CHECKED[model] = True


def rows_nll(model: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log p(target) for each row of final hidden states `hidden` (N, H); logits in chunks."""
    vocab = model.get_output_embeddings().weight.shape[0]
    rows = max(1, LOGIT_ELEMENTS_PER_CHUNK // vocab)
    return torch.cat([F.cross_entropy(head_logits(model, hidden[start:start + rows]), targets[start:start + rows],
                                      reduction="none") for start in range(0, hidden.shape[0], rows)])


def pad_batch(sequences: Sequence[Sequence[int]], device: torch.device, pad_id: int = 0,
              left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of `sequences` on `device`, right-padded (or left-padded) to the longest."""
    width = max(len(seq) for seq in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if left else slice(0, len(seq))
        input_ids[row, span] = torch.as_tensor(seq, dtype=torch.long)
        attention_mask[row, span] = 1
    return input_ids.to(device), attention_mask.to(device)


def length_batches(sequences: Sequence[Sequence], batch_size: int) -> list[list[int]]:
    """Indices of `sequences`, longest first, in batches of `batch_size` (little padding per batch)."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]), reverse=True)
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def token_nll(model: torch.nn.Module, sequences: Sequence[Sequence[int]], num_context: Sequence[int], *,
              batch_size: int = 4, device: torch.device | str | None = None, progress: bool = True,
              desc: str = "scoring") -> list[torch.Tensor]:
    """Next-token NLL (nats, float32) of every token of `seq[num_context:]` given the tokens before it.

    `num_context[i] >= 1` leading tokens of sequence i are conditioning only; entry t of the result
    is -log p(seq[n + t] | seq[:n + t]) with n = num_context[i]. Sequences are sorted by length and
    right-padded into batches of `batch_size` (padding never influences real positions of a
    causal model); results come back in the input order. For a transformers causal LM the
    vocabulary projection runs only on the scored positions and in chunks (`rows_nll`), so context
    tokens cost no logits and no (tokens x vocabulary) tensor is ever materialised; other modules
    are scored through their full `forward(...).logits`.
    """
    if len(sequences) != len(num_context):
        raise ValueError(f"Got {len(sequences)} sequences but {len(num_context)} context lengths")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for i, (seq, n_ctx) in enumerate(zip(sequences, num_context)):
        if not 1 <= n_ctx < len(seq):
            raise ValueError(f"Sequence {i} has {len(seq)} tokens and {n_ctx} context tokens; need at least one "
                             "context token and one scored token.")
    if not sequences:
        return []
    check_ids_fit_model(model, max(max(seq) for seq in sequences))
    device = model_device(model, device)
    fast = has_separate_head(model)
    result: list[torch.Tensor] = [torch.empty(0)] * len(sequences)
    batches = length_batches(sequences, batch_size)
    with evaluation_mode(model):
        if fast:
            check_head_matches_forward(model, sequences[batches[-1][-1]])
        for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
            input_ids, attention_mask = pad_batch([sequences[i] for i in batch], device)
            # Position t predicts token t + 1: the scored rows are num_context - 1 .. len - 2.
            scored = torch.zeros_like(attention_mask, dtype=torch.bool)
            for row, index in enumerate(batch):
                scored[row, num_context[index] - 1 : len(sequences[index]) - 1] = True
            targets = input_ids[:, 1:][scored[:, :-1]]
            if fast:
                hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                          use_cache=False).last_hidden_state
                nll = rows_nll(model, hidden[scored], targets)
            else:
                logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
                nll = F.cross_entropy(logits[scored].float(), targets, reduction="none")
            counts = scored.sum(dim=1).tolist()
            for index, part in zip(batch, torch.split(nll.cpu(), counts)):
                result[index] = part
    return result


def score_sequences(model: torch.nn.Module, sequences: Sequence[Sequence[int]], num_context: Sequence[int], *,
                    batch_size: int = 4, device: torch.device | str | None = None, progress: bool = True,
                    desc: str = "scoring") -> list[float]:
    """Summed next-token NLL (nats) of `seq[num_context:]` given everything before, per sequence
    (the sums of `token_nll`)."""
    return [float(part.double().sum()) for part in token_nll(
        model, sequences, num_context, batch_size=batch_size, device=device, progress=progress, desc=desc)]


def score_continuations(model: torch.nn.Module, contexts: Sequence[Sequence[int]],
                        continuations: Sequence[Sequence[Sequence[int]]], *, batch_size: int = 16,
                        rows_per_forward: int = 8, device: torch.device | str | None = None, progress: bool = True,
                        desc: str = "scoring") -> list[list[torch.Tensor]]:
    """Per-token NLL of each continuation of each context: `result[i][j][t]` =
    -log p(continuations[i][j][t] | contexts[i] + continuations[i][j][:t]).

    The same numbers as `token_nll` on the concatenated sequences, but each context runs through the
    model once for all its continuations: contexts are sorted by length and `batch_size` of them are
    left-padded into one forward that keeps the key/value cache (and the hidden state of the last
    context position, which predicts every continuation's first token). Their continuations are
    then sorted by length and run right-padded, `rows_per_forward` at a time, on a copy of the cache
    rows of their own contexts, with positions that continue their own context - so neither a long
    context nor a long continuation pads the others much. Models without a separate head are
    scored through `token_nll` on the concatenations.
    """
    if len(contexts) != len(continuations):
        raise ValueError(f"Got {len(contexts)} contexts but {len(continuations)} continuation lists")
    if batch_size < 1 or rows_per_forward < 1:
        raise ValueError(f"batch_size and rows_per_forward must be >= 1, got {batch_size}, {rows_per_forward}")
    for i, (context, options) in enumerate(zip(contexts, continuations)):
        if not context or not options or any(not option for option in options):
            raise ValueError(f"Context {i} needs at least one token and one or more non-empty continuations")
    if not contexts:
        return []
    check_ids_fit_model(model, max(max(max(c) for c in contexts), max(max(o) for opts in continuations for o in opts)))
    result: list[list[torch.Tensor]] = [[torch.empty(0)] * len(options) for options in continuations]
    if not has_separate_head(model):
        flat = [(i, j) for i, options in enumerate(continuations) for j in range(len(options))]
        parts = token_nll(model, [[*contexts[i], *continuations[i][j]] for i, j in flat],
                          [len(contexts[i]) for i, _ in flat], batch_size=batch_size, device=device,
                          progress=progress, desc=desc)
        for (i, j), part in zip(flat, parts):
            result[i][j] = part
        return result

    device = model_device(model, device)
    batches = length_batches(contexts, batch_size)
    shortest = batches[-1][-1]
    with evaluation_mode(model):
        check_head_matches_forward(model, [*contexts[shortest], *continuations[shortest][0]])
        for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
            ctx_ids, ctx_mask = pad_batch([contexts[i] for i in batch], device, left=True)
            out = model.base_model(input_ids=ctx_ids, attention_mask=ctx_mask,
                                   position_ids=(ctx_mask.cumsum(dim=1) - 1).clamp(min=0), use_cache=True)
            cache, last_hidden = out.cache, out.last_hidden_state[:, -1]
            lengths = torch.as_tensor([len(contexts[i]) for i in batch], device=device)
            rows = sorted(((row, j) for row, i in enumerate(batch) for j in range(len(continuations[i]))),
                          key=lambda rj: len(continuations[batch[rj[0]]][rj[1]]), reverse=True)
            for start in range(0, len(rows), rows_per_forward):
                chunk = rows[start : start + rows_per_forward]
                owner = torch.as_tensor([row for row, _ in chunk], device=device)
                options = [continuations[batch[row]][j] for row, j in chunk]
                opt_ids, opt_mask = pad_batch(options, device)
                chunk_cache = copy.deepcopy(cache)
                chunk_cache.batch_select_indices(owner)
                positions = lengths[owner][:, None] + torch.arange(opt_ids.shape[1], device=device)[None, :]
                hidden = model.base_model(input_ids=opt_ids, attention_mask=torch.cat([ctx_mask[owner], opt_mask], 1),
                                          position_ids=positions, cache=chunk_cache, use_cache=True).last_hidden_state
                # Row r predicts its token 0 from its context's last position, token t + 1 from option position t.
                lengths_opt = opt_mask.sum(dim=1)
                later = opt_mask.bool().clone()
                later[torch.arange(len(options), device=device), lengths_opt - 1] = False
                states = torch.cat([last_hidden[owner][:, None], hidden], dim=1)
                scored = torch.cat([torch.ones(len(options), 1, dtype=torch.bool, device=device), later], dim=1)
                nll = rows_nll(model, states[scored], opt_ids[opt_mask.bool()])
                for (row, j), part in zip(chunk, torch.split(nll.cpu(), lengths_opt.tolist())):
                    result[batch[row]][j] = part
                del chunk_cache
            del cache, out
    return result
