"""AIM adapter for Qwen3 (dense). Larger Qwen3 models have untied LM heads: train them with NTP."""

from __future__ import annotations

import torch
from torch import nn

from matt.modeling.base import PreTrainedModelForAIM
from matt.modeling.embeddings import PartlyFrozenEmbedding


class Qwen3ForAIM(PreTrainedModelForAIM):
    model_types = ("qwen3",)

    def get_base_model(self, model: nn.Module) -> nn.Module:
        return model.model

    def get_layers(self) -> nn.ModuleList:
        return self.model.layers

    def set_layers(self, layers: list[nn.Module]) -> None:
        self.model.layers = nn.ModuleList(layers)

    def create_partly_frozen_embeddings(self, frozen_mask: torch.Tensor | None) -> PartlyFrozenEmbedding:
        return PartlyFrozenEmbedding.from_embedding(self.model.embed_tokens, frozen_mask)
