"""AIM adapter for Llama (Llama 2/3, SmolLM2 and other `model_type="llama"` checkpoints)."""

from __future__ import annotations

import torch
from torch import nn

from matt.modeling.base import PreTrainedModelForAIM
from matt.modeling.embeddings import PartlyFrozenEmbedding


class LlamaForAIM(PreTrainedModelForAIM):
    model_types = ("llama",)

    def get_base_model(self, model: nn.Module) -> nn.Module:
        return model.model

    def get_layers(self) -> nn.ModuleList:
        return self.model.layers

    def set_layers(self, layers: list[nn.Module]) -> None:
        self.model.layers = nn.ModuleList(layers)

    def create_partly_frozen_embeddings(self, frozen_mask: torch.Tensor | None) -> PartlyFrozenEmbedding:
        return PartlyFrozenEmbedding.from_embedding(self.model.embed_tokens, frozen_mask)
