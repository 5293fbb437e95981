"""Embedding tables whose rows are partly frozen, and an LM head built on such a table.

Tokens shared by the teacher and student tokenizers can keep their (already good) embeddings,
so only the other rows are learned. Storing the two kinds of rows separately — frozen rows as a
buffer in the model's dtype, trainable rows as one float32 `nn.Parameter` — means optimizers,
gradient clipping and weight decay only ever see the trainable rows, and no (V, D) matrix is
copied per step: a lookup gathers from both stores through an id → row map and picks per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PartlyFrozenEmbedding(nn.Module):
    """An embedding table whose `frozen_mask` rows never change.

    Args:
        weight: (V, D) initial table (copied; the caller's tensor is not kept).
        frozen_mask: (V,) bool, True = frozen row. None or all-False: every row trainable.
        scale: multiplier applied to looked-up vectors (Gemma multiplies by sqrt(hidden_size));
            the stored rows and `full_weight()` are unscaled.
        padding_idx: as in `nn.Embedding`, the gradient of that row is always zero.

    Trainable rows are kept in float32 (master weights, whatever the model dtype); looked-up
    vectors are returned in the dtype of `weight`, so the rest of the model runs unchanged.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        frozen_mask: torch.Tensor | None = None,
        scale: float | torch.Tensor = 1.0,
        padding_idx: int | None = None,
    ) -> None:
        super().__init__()
        if weight.ndim != 2:
            raise ValueError(f"weight must be a (vocab, dim) matrix, got shape {tuple(weight.shape)}")
        vocab_size, dim = weight.shape
        weight = weight.detach()
        if frozen_mask is None:
            frozen_mask = torch.zeros(vocab_size, dtype=torch.bool)
        frozen_mask = torch.as_tensor(frozen_mask)
        if frozen_mask.dtype != torch.bool or frozen_mask.shape != (vocab_size,):
            raise ValueError(
                f"frozen_mask must be a bool tensor of shape ({vocab_size},) (one entry per embedding "
                f"row), got dtype {frozen_mask.dtype} and shape {tuple(frozen_mask.shape)}"
            )
        if padding_idx is not None and not -vocab_size <= padding_idx < vocab_size:
            raise ValueError(f"padding_idx={padding_idx} is outside the {vocab_size} embedding rows")
        frozen_mask = frozen_mask.to(weight.device)
        self.num_embeddings, self.embedding_dim = vocab_size, dim
        self.padding_idx = padding_idx % vocab_size if padding_idx is not None else None

        frozen_ids = frozen_mask.nonzero().squeeze(1)
        trainable_ids = (~frozen_mask).nonzero().squeeze(1)
        master_dtype = torch.promote_types(weight.dtype, torch.float32)
        self.trainable = nn.Parameter(weight[trainable_ids].to(master_dtype, copy=True))
        # Always present (possibly with 0 rows): its dtype is the dtype looked-up vectors take.
        self.register_buffer("frozen", weight[frozen_ids].clone())
        # id -> row in `trainable` / `frozen` (0 where the id lives in the other store: the
        # torch.where below discards that lookup, and its gradient is zero).
        trainable_row = torch.zeros(vocab_size, dtype=torch.long, device=weight.device)
        trainable_row[trainable_ids] = torch.arange(len(trainable_ids), device=weight.device)
        frozen_row = torch.zeros(vocab_size, dtype=torch.long, device=weight.device)
        frozen_row[frozen_ids] = torch.arange(len(frozen_ids), device=weight.device)
        self.register_buffer("is_trainable", ~frozen_mask)
        self.register_buffer("trainable_row", trainable_row)
        self.register_buffer("frozen_row", frozen_row)
        # Row of the padding id inside `trainable` (its gradient is zeroed), if that row trains.
        self._trainable_padding_row = (
            int(trainable_row[self.padding_idx]) if self.padding_idx is not None and not frozen_mask[self.padding_idx]
            else None
        )
        has_scale = isinstance(scale, torch.Tensor) or scale != 1.0
        scale_tensor = torch.as_tensor(scale, dtype=torch.float32).detach().clone() if has_scale else None
        self.register_buffer("scale", scale_tensor, persistent=False)

    @classmethod
    def from_embedding(
        cls, embedding: nn.Embedding, frozen_mask: torch.Tensor | None, scale: float | torch.Tensor = 1.0
    ) -> "PartlyFrozenEmbedding":
        """Build from an `nn.Embedding` (keeps its padding row)."""
        return cls(embedding.weight, frozen_mask, scale=scale, padding_idx=embedding.padding_idx)

    @property
    def frozen_mask(self) -> torch.Tensor:
        return ~self.is_trainable

    @property
    def num_trainable(self) -> int:
        return self.trainable.shape[0]

    def _lookup(self, input_ids: torch.Tensor) -> torch.Tensor:
        out_dtype, trainable_padding = self.frozen.dtype, self._trainable_padding_row
        if self.frozen.shape[0] == 0:  # nothing frozen: ids are rows of `trainable`
            return F.embedding(input_ids, self.trainable, padding_idx=trainable_padding).to(out_dtype)
        if self.trainable.shape[0] == 0:
            return F.embedding(input_ids, self.frozen)
        learned = F.embedding(self.trainable_row[input_ids], self.trainable,
                              padding_idx=trainable_padding).to(out_dtype)
        kept = F.embedding(self.frozen_row[input_ids], self.frozen)
        return torch.where(self.is_trainable[input_ids].unsqueeze(-1), learned, kept)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.numel() and bool(((input_ids < 0) | (input_ids >= self.num_embeddings)).any()):
            raise IndexError(
                f"token ids must be in [0, {self.num_embeddings}) (the embedding rows); got "
                f"min {int(input_ids.min())}, max {int(input_ids.max())}"
            )
        out = self._lookup(input_ids)
        if self.scale is not None:
            out = out * self.scale.to(out.dtype)
        return out

    def materialize(self) -> torch.Tensor:
        """The (V, D) unscaled table, differentiable w.r.t. the trainable rows (for LM heads)."""
        if self.frozen.shape[0] == 0:
            return self.trainable.to(self.frozen.dtype)
        if self.trainable.shape[0] == 0:
            return self.frozen
        return self._lookup(torch.arange(self.num_embeddings, device=self.trainable_row.device))

    @torch.no_grad()
    def full_weight(self) -> torch.Tensor:
        """The (V, D) unscaled table, detached, in the trainable rows' float32 precision (export)."""
        out = torch.empty(self.num_embeddings, self.embedding_dim, dtype=self.trainable.dtype,
                          device=self.trainable.device)
        out[self.is_trainable] = self.trainable
        out[~self.is_trainable] = self.frozen.to(out.dtype)
        return out

    def extra_repr(self) -> str:
        scale = "" if self.scale is None else f", scale={float(self.scale):.6g}"
        return (f"{self.num_embeddings}, {self.embedding_dim}, trainable_rows={self.num_trainable}, "
                f"frozen_rows={self.frozen.shape[0]}{scale}")


class EmbeddingLMHead(nn.Module):
    """An LM head whose weight is a `PartlyFrozenEmbedding` table: logits = h · Wᵀ (+ bias).

    Used both for tied heads (the table *is* the model's input embedding module, so the two
    stay one set of parameters) and for untied heads trained with next-token prediction.
    """

    def __init__(self, table: PartlyFrozenEmbedding, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.table = table
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight = self.table.materialize().to(hidden_states.dtype)
        bias = None if self.bias is None else self.bias.to(hidden_states.dtype)
        return F.linear(hidden_states, weight, bias)

    def extra_repr(self) -> str:
        return f"bias={self.bias is not None}"
