"""Model adapters: a HF causal LM seen through its AIM layer (attention probs + values).

Importing this package registers the `matt_aim` attention implementation with transformers.
"""

from matt.modeling.base import AIMOutput, PreTrainedModelForAIM, check_compatible, check_vocab
from matt.modeling.embeddings import EmbeddingLMHead, PartlyFrozenEmbedding
from matt.modeling.gemma3 import Gemma3ForAIM
from matt.modeling.gpt_neox import GPTNeoXForAIM
from matt.modeling.llama import LlamaForAIM, MistralForAIM, Qwen3ForAIM
from matt.modeling.registry import FAMILIES, adapter_for, register_adapter

__all__ = [
    "AIMOutput",
    "EmbeddingLMHead",
    "FAMILIES",
    "Gemma3ForAIM",
    "GPTNeoXForAIM",
    "LlamaForAIM",
    "MistralForAIM",
    "PartlyFrozenEmbedding",
    "PreTrainedModelForAIM",
    "Qwen3ForAIM",
    "adapter_for",
    "check_compatible",
    "check_vocab",
    "register_adapter",
]
