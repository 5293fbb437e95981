"""AIM adapter for Gemma 3: text-only `Gemma3ForCausalLM` and multimodal
`Gemma3ForConditionalGeneration` (what `AutoModelForCausalLM` loads for the 4B/12B/27B
checkpoints; only its language model takes part, the vision tower is never run).

Gemma multiplies looked-up embeddings by sqrt(hidden_size); the partly frozen table keeps that
scale, while the stored (and exported) rows stay unscaled like HF's weight.
"""

from __future__ import annotations

import torch
from torch import nn

from matt.modeling.base import PreTrainedModelForAIM
from matt.modeling.embeddings import PartlyFrozenEmbedding


class Gemma3ForAIM(PreTrainedModelForAIM):
    model_types = ("gemma3_text", "gemma3")

    def get_base_model(self, model: nn.Module) -> nn.Module:
        if hasattr(model.model, "language_model"):  # Gemma3ForConditionalGeneration
            return model.model.language_model
        return model.model

    def create_partly_frozen_embeddings(self, frozen_mask: torch.Tensor | None) -> PartlyFrozenEmbedding:
        embed_tokens = self.model.embed_tokens
        return PartlyFrozenEmbedding.from_embedding(embed_tokens, frozen_mask, scale=embed_tokens.embed_scale)
