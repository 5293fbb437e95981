"""Next-token cross-entropy through an LM head without a (tokens × vocabulary) logits tensor.

With a 262K vocabulary (Gemma 3) the plain `F.cross_entropy(F.linear(h, W), y)` costs, per
step, a (V, D) gather of the partly frozen table, a (N, V) float32 logits tensor, its softmax
and gradient (each as large again), and three (N × V × D) matrix products — one of them the
gradient of W, although only the few new rows of W train. `linear_cross_entropy` computes the
same value and gradients block by block:

* forward: for each block of tokens and of vocabulary rows, logits = h·Wᵀ (+ bias, optional
  soft-capping); a running log-sum-exp keeps only one float per token; the target logit comes
  from a gather of the target rows. Nothing is recorded for autograd.
* backward: the blocks are recomputed. Frozen rows get no gradient, so their blocks are only
  visited when the hidden states need one; with a detached head input (`ntp_scope=head`) the
  backward touches the trainable rows alone.

Peak memory is a few (token chunk × vocabulary chunk) blocks plus O(N) per-token floats, the
same at any vocabulary size. No maintained library fits here: Liger's fused linear
cross-entropy and Apple's cut-cross-entropy are Triton (GPU) kernels over a single weight matrix
whose gradient they compute in full, while this head is split into frozen and trainable stores
and must run on CPU too.
"""

from __future__ import annotations

import torch
from torch import nn

from matt.modeling.embeddings import EmbeddingLMHead

IGNORE_INDEX = -100
TOKEN_CHUNK = 512
VOCAB_CHUNK = 4096


def _blocks(frozen: torch.Tensor, trainable: torch.Tensor, vocab_chunk: int):
    """(row offset in [frozen; trainable], weight block, offset in `trainable` or None if frozen)."""
    for start in range(0, frozen.shape[0], vocab_chunk):
        yield start, frozen[start:start + vocab_chunk], None
    for start in range(0, trainable.shape[0], vocab_chunk):
        yield frozen.shape[0] + start, trainable[start:start + vocab_chunk], start


def _gather_rows(frozen: torch.Tensor, trainable: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows `rows` of the virtual matrix [frozen; trainable], in the compute dtype of the caller."""
    n_frozen = frozen.shape[0]
    if trainable.shape[0] == 0:
        return frozen[rows]
    if n_frozen == 0:
        return trainable[rows]
    in_frozen = (rows < n_frozen).unsqueeze(1)
    return torch.where(in_frozen, frozen[rows.clamp(max=n_frozen - 1)].to(trainable.dtype),
                       trainable[(rows - n_frozen).clamp(min=0)])


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits = hidden·[frozen; trainable]ᵀ (+ bias), computed in blocks.

    `targets` index rows of [frozen; trainable] (-1 = ignored position); `frozen` never gets a
    gradient. Logits are rounded to `compute_dtype` as `F.linear` in that dtype would, and the
    softmax runs in float32.
    """

    @staticmethod
    def forward(ctx, hidden, frozen, trainable, bias, targets, compute_dtype, softcap, token_chunk, vocab_chunk,
                zero_grad_row):
        n_tokens = hidden.shape[0]
        valid = targets >= 0
        n_valid = valid.sum()
        lse = torch.full((n_tokens,), float("-inf"), dtype=_softmax_dtype(compute_dtype), device=hidden.device)
        for a in range(0, n_tokens, token_chunk):
            h = hidden[a:a + token_chunk].to(compute_dtype)
            running = lse[a:a + token_chunk]
            for offset, weight, _ in _blocks(frozen, trainable, vocab_chunk):
                z = _logits(h, weight, bias, offset, compute_dtype, softcap)
                torch.logaddexp(running, torch.logsumexp(z, dim=1), out=running)
        target_rows = targets.clamp(min=0)
        target_logit = _target_logits(hidden, frozen, trainable, bias, target_rows, compute_dtype, softcap)
        per_token = torch.where(valid, lse - target_logit, torch.zeros_like(lse))
        loss = per_token.sum() / n_valid  # no valid target: 0/0 = nan, as F.cross_entropy gives
        ctx.save_for_backward(hidden, frozen, trainable, bias, targets, lse, target_logit)
        ctx.options = (compute_dtype, softcap, token_chunk, vocab_chunk, zero_grad_row)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, frozen, trainable, bias, targets, lse, target_logit = ctx.saved_tensors
        compute_dtype, softcap, token_chunk, vocab_chunk, zero_grad_row = ctx.options
        need_hidden, need_trainable = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        valid = targets >= 0
        # d loss / d logit[n, v] = coef[n] · (softmax[n, v] - [v == target[n]])
        acc_dtype = lse.dtype
        coef = torch.where(valid, grad_loss.to(acc_dtype) / valid.sum(), lse.new_zeros(()))
        grad_hidden = torch.zeros(hidden.shape, dtype=acc_dtype, device=hidden.device) if need_hidden else None
        grad_trainable = (torch.zeros(trainable.shape, dtype=acc_dtype, device=trainable.device)
                          if need_trainable else None)
        if need_hidden or need_trainable:
            for a in range(0, hidden.shape[0], token_chunk):
                h = hidden[a:a + token_chunk].to(compute_dtype)
                lse_chunk, coef_chunk = lse[a:a + token_chunk, None], coef[a:a + token_chunk, None]
                for offset, weight, trainable_start in _blocks(frozen, trainable, vocab_chunk):
                    is_trainable_block = trainable_start is not None
                    if not need_hidden and not is_trainable_block:
                        continue  # a frozen block only matters for the hidden states' gradient
                    z = _logits(h, weight, bias, offset, compute_dtype, softcap)
                    grad_z = (z - lse_chunk).exp_().mul_(coef_chunk)
                    if softcap is not None:
                        grad_z.mul_(1 - (z / softcap).square())
                    grad_z = grad_z.to(compute_dtype)
                    if need_hidden:
                        grad_hidden[a:a + token_chunk] += grad_z @ weight.to(compute_dtype)
                    if need_trainable and is_trainable_block:
                        grad_trainable[trainable_start:trainable_start + weight.shape[0]] += grad_z.T @ h
            # the one-hot part: -coef at each token's target logit
            grad_target = -coef
            if softcap is not None:
                grad_target = grad_target * (1 - (target_logit / softcap).square())
            target_rows = targets.clamp(min=0)
            if need_hidden:
                target_weight = _gather_rows(frozen, trainable, target_rows).to(compute_dtype).to(acc_dtype)
                grad_hidden += grad_target[:, None] * target_weight
            if need_trainable:
                n_frozen = frozen.shape[0]
                in_trainable = valid & (target_rows >= n_frozen)
                h_target = hidden[in_trainable].to(compute_dtype).to(acc_dtype)
                grad_trainable.index_add_(0, target_rows[in_trainable] - n_frozen,
                                          grad_target[in_trainable, None] * h_target)
                if zero_grad_row is not None:
                    grad_trainable[zero_grad_row] = 0
        return (None if grad_hidden is None else grad_hidden.to(hidden.dtype), None,
                None if grad_trainable is None else grad_trainable.to(trainable.dtype),
                None, None, None, None, None, None, None)


def _softmax_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for float64 products."""
    return torch.promote_types(compute_dtype, torch.float32)


def _logits(h, weight, bias, offset, compute_dtype, softcap) -> torch.Tensor:
    """Logits of one block in the softmax dtype; rounded to `compute_dtype` first, as F.linear would."""
    acc = _softmax_dtype(compute_dtype)
    z = (h @ weight.to(compute_dtype).T).to(acc)
    if bias is not None:
        z += bias[offset:offset + weight.shape[0]].to(compute_dtype).to(acc)
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    return z


def _target_logits(hidden, frozen, trainable, bias, rows, compute_dtype, softcap) -> torch.Tensor:
    acc = _softmax_dtype(compute_dtype)
    weight = _gather_rows(frozen, trainable, rows).to(compute_dtype)
    z = (hidden.to(compute_dtype).to(acc) * weight.to(acc)).sum(-1).to(compute_dtype).to(acc)
    if bias is not None:
        z = z + bias[rows].to(compute_dtype).to(acc)
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    return z


def linear_cross_entropy(
    hidden: torch.Tensor,
    frozen: torch.Tensor,
    trainable: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
    softcap: float | None = None,
    zero_grad_row: int | None = None,
    token_chunk: int = TOKEN_CHUNK,
    vocab_chunk: int = VOCAB_CHUNK,
) -> torch.Tensor:
    """Mean over targets ≥ 0 of `F.cross_entropy(softcap(hidden @ W.T + bias), targets)` with
    W = [frozen; trainable], without materialising W or the logits.

    Args:
        hidden: (N, D) head inputs.
        frozen: (F, D) rows that never get a gradient (detached here).
        trainable: (T, D) rows that get one when they require it.
        targets: (N,) long, rows of W; negative = position ignored.
        bias: (F + T,) in the same row order, no gradient.
        compute_dtype: dtype of the matrix products (default `hidden.dtype`); the softmax is float32.
        softcap: Gemma-style `c · tanh(logits / c)` applied to the logits.
        zero_grad_row: a row of `trainable` whose gradient is forced to zero (a padding row).
    """
    if hidden.ndim != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"hidden must be (N, D) and targets (N,), got {tuple(hidden.shape)} "
                         f"and {tuple(targets.shape)}")
    if frozen.shape[1:] != hidden.shape[1:] or trainable.shape[1:] != hidden.shape[1:]:
        raise ValueError(f"weight rows must have the hidden size {hidden.shape[1]}, got frozen "
                         f"{tuple(frozen.shape)} and trainable {tuple(trainable.shape)}")
    n_rows = frozen.shape[0] + trainable.shape[0]
    if targets.numel() and int(targets.max()) >= n_rows:
        raise IndexError(f"target row {int(targets.max())} is outside the {n_rows} rows of the LM head")
    if token_chunk < 1 or vocab_chunk < 1:
        raise ValueError(f"token_chunk and vocab_chunk must be positive, got {token_chunk} and {vocab_chunk}")
    return _LinearCrossEntropy.apply(
        hidden, frozen.detach(), trainable, None if bias is None else bias.detach(), targets,
        compute_dtype or hidden.dtype, softcap, token_chunk, vocab_chunk, zero_grad_row)


def lm_head_cross_entropy(
    head: nn.Module,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    *,
    softcap: float | None = None,
    ignore_index: int = IGNORE_INDEX,
    token_chunk: int = TOKEN_CHUNK,
    vocab_chunk: int = VOCAB_CHUNK,
) -> torch.Tensor:
    """`F.cross_entropy(head(hidden), labels, ignore_index=ignore_index)` (mean), chunked.

    `head` is an `EmbeddingLMHead` (frozen rows stay frozen; the trainable rows and, if it requires
    one, `hidden` get gradients equal to the plain computation's) or a bias-free `nn.Linear`
    (trainable as a whole iff its weight requires grad). `hidden` is (..., D), `labels` its
    leading shape, holding vocabulary ids or `ignore_index`.
    """
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal hidden states' leading shape "
                         f"{tuple(hidden.shape[:-1])}")
    is_table = isinstance(head, EmbeddingLMHead)
    if not is_table and not (isinstance(head, nn.Linear) and head.bias is None):
        raise TypeError(f"lm_head_cross_entropy supports EmbeddingLMHead and bias-free nn.Linear heads, "
                        f"got {type(head).__name__}")
    hidden, labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    ignored = labels == ignore_index
    vocab = head.table.num_embeddings if is_table else head.out_features
    if bool(((labels < 0) | (labels >= vocab))[~ignored].any()):
        raise IndexError(f"labels must be in [0, {vocab}) (the LM head's rows) or {ignore_index}")
    ids = labels.masked_fill(ignored, 0)
    compute_dtype = hidden.dtype  # the dtype `F.linear` would run in here: autocast's where it is on
    if torch.is_autocast_enabled(hidden.device.type):
        compute_dtype = torch.get_autocast_dtype(hidden.device.type)
    if is_table:
        table = head.table
        n_frozen = table.frozen.shape[0]
        rows = torch.where(table.is_trainable[ids], n_frozen + table.trainable_row[ids], table.frozen_row[ids])
        frozen = table.frozen
        # materialize() rounds trainable rows to the table's dtype before F.linear; so do we
        trainable = table.trainable.to(frozen.dtype)
        bias = None
        if head.bias is not None:
            order = torch.cat([(~table.is_trainable).nonzero().squeeze(1), table.is_trainable.nonzero().squeeze(1)])
            bias = head.bias[order]
        # materialize() zeroes the padding row's gradient only when it goes through the lookup
        zero_row = table._trainable_padding_row if n_frozen and table.num_trainable else None
    else:
        rows = ids
        empty = head.weight.new_zeros((0, head.weight.shape[1]))
        frozen, trainable = (empty, head.weight) if head.weight.requires_grad else (head.weight, empty)
        bias, zero_row = None, None
    targets = rows.masked_fill(ignored, -1)
    return linear_cross_entropy(hidden, frozen, trainable, targets, bias=bias, compute_dtype=compute_dtype,
                                softcap=softcap, zero_grad_row=zero_row, token_chunk=token_chunk,
                                vocab_chunk=vocab_chunk)

