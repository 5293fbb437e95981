"""AIM adapter for GPT-NeoX (Pythia): fused QKV projection, parallel residual, `embed_in`."""

from __future__ import annotations

import torch
from torch import nn

from matt.modeling.base import PreTrainedModelForAIM
from matt.modeling.embeddings import PartlyFrozenEmbedding


class GPTNeoXForAIM(PreTrainedModelForAIM):
    model_types = ("gpt_neox",)

    def get_base_model(self, model: nn.Module) -> nn.Module:
        return model.gpt_neox

    def create_partly_frozen_embeddings(self, frozen_mask: torch.Tensor | None) -> PartlyFrozenEmbedding:
        return PartlyFrozenEmbedding.from_embedding(self.model.embed_in, frozen_mask)
