"""AIM adapter for Llama-layout decoders: Llama (2/3, SmolLM2), Mistral and Qwen3 (dense).

All three keep their layers in `model.model.layers` and their input embeddings in
`model.model.embed_tokens`, so one class serves them. Mistral's sliding window is honoured
through the model's own masks; larger Qwen3 models have untied LM heads: train them with NTP.
"""

from __future__ import annotations

import torch
from torch import nn

from matt.modeling.base import PreTrainedModelForAIM
from matt.modeling.embeddings import PartlyFrozenEmbedding


class LlamaForAIM(PreTrainedModelForAIM):
    model_types = ("llama", "mistral", "qwen3")

    def get_base_model(self, model: nn.Module) -> nn.Module:
        return model.model

    def create_partly_frozen_embeddings(self, frozen_mask: torch.Tensor | None) -> PartlyFrozenEmbedding:
        return PartlyFrozenEmbedding.from_embedding(self.model.embed_tokens, frozen_mask)


MistralForAIM = LlamaForAIM  # names used before the three families shared one class
Qwen3ForAIM = LlamaForAIM
