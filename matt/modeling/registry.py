"""Pick the adapter class for a model from its `config.model_type`."""

from __future__ import annotations

import os

from matt.modeling.base import PreTrainedModelForAIM
from matt.modeling.gemma3 import Gemma3ForAIM
from matt.modeling.gpt_neox import GPTNeoXForAIM
from matt.modeling.llama import LlamaForAIM
from matt.modeling.mistral import MistralForAIM
from matt.modeling.qwen3 import Qwen3ForAIM

ADAPTERS: tuple[type[PreTrainedModelForAIM], ...] = (
    LlamaForAIM, Gemma3ForAIM, MistralForAIM, Qwen3ForAIM, GPTNeoXForAIM,
)
ADAPTER_BY_MODEL_TYPE: dict[str, type[PreTrainedModelForAIM]] = {
    model_type: adapter for adapter in ADAPTERS for model_type in adapter.model_types
}


def adapter_for(model_or_config) -> type[PreTrainedModelForAIM]:
    """The adapter class for a loaded model, a config, or a local model directory."""
    if isinstance(model_or_config, (str, os.PathLike)):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_or_config)
    else:
        config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTER_BY_MODEL_TYPE:
        raise ValueError(
            f"No AIM adapter for model_type {model_type!r}; supported: {sorted(ADAPTER_BY_MODEL_TYPE)}. "
            "To support another architecture, subclass PreTrainedModelForAIM and implement its four "
            "hooks (README: 'Adding a model family'), then matt.modeling.registry.register_adapter(YourAdapter)."
        )
    return ADAPTER_BY_MODEL_TYPE[model_type]


def register_adapter(adapter: type[PreTrainedModelForAIM]) -> type[PreTrainedModelForAIM]:
    """Let `adapter_for` pick a user-defined adapter for its `model_types` (usable as a decorator)."""
    if not adapter.model_types:
        raise ValueError(f"{adapter.__name__}.model_types is empty: name the config.model_type values it handles")
    for model_type in adapter.model_types:
        ADAPTER_BY_MODEL_TYPE[model_type] = adapter
    return adapter
