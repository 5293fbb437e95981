"""The model families MATT knows, and the adapter class for a model (from its `config.model_type`).

`FAMILIES` is the one list of families: `model.family` in the Hydra configs (checked by
preflight), `adapter_for` and the tiny test models (`matt.tiny`) all read it. A family is a name,
an adapter class and the `config.model_type` values it covers; `register_adapter` adds one (or
replaces one) at runtime, through the same checks as the shipped families below.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from matt.modeling.base import PreTrainedModelForAIM
from matt.modeling.gemma3 import Gemma3ForAIM
from matt.modeling.gpt_neox import GPTNeoXForAIM
from matt.modeling.llama import LlamaForAIM


@dataclass(frozen=True)
class Family:
    adapter: type[PreTrainedModelForAIM]
    model_types: tuple[str, ...]


FAMILIES: dict[str, Family] = {}


def family_of(model_type: str | None) -> str | None:
    """The name of the registered family covering `model_type` (None if no family does)."""
    return next((name for name, family in FAMILIES.items() if model_type in family.model_types), None)


def supported_model_types() -> list[str]:
    return sorted(model_type for family in FAMILIES.values() for model_type in family.model_types)


def register_adapter(
    adapter: type[PreTrainedModelForAIM], family: str | None = None, model_types: tuple[str, ...] | None = None
) -> type[PreTrainedModelForAIM]:
    """Register `adapter` as model family `family` (default: its first model type) for `model_types`
    (default: all of `adapter.model_types`). Usable as a decorator. Registering an existing family's
    name replaces that family."""
    model_types = tuple(model_types or adapter.model_types)
    if not model_types:
        raise ValueError(f"{adapter.__name__}.model_types is empty: name the config.model_type values it handles")
    unhandled = [model_type for model_type in model_types if model_type not in adapter.model_types]
    if unhandled:
        raise ValueError(f"{adapter.__name__} does not handle model_type {unhandled}: add it to "
                         f"{adapter.__name__}.model_types {list(adapter.model_types)}")
    family = family or model_types[0]
    for model_type in model_types:
        owner = family_of(model_type)
        if owner not in (None, family):
            raise ValueError(f"model_type {model_type!r} already belongs to family {owner!r}: register "
                             f"{adapter.__name__} under that name to replace it")
    FAMILIES[family] = Family(adapter, model_types)
    return adapter


register_adapter(LlamaForAIM, "llama", ("llama",))
register_adapter(Gemma3ForAIM, "gemma3")
register_adapter(LlamaForAIM, "mistral", ("mistral",))
register_adapter(LlamaForAIM, "qwen3", ("qwen3",))
register_adapter(GPTNeoXForAIM, "gpt_neox")
SHIPPED_FAMILIES: tuple[str, ...] = tuple(FAMILIES)


def adapter_for(model_or_config) -> type[PreTrainedModelForAIM]:
    """The adapter class for a loaded model, a config, or a local model directory."""
    if isinstance(model_or_config, (str, os.PathLike)):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_or_config)
    else:
        config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    family = family_of(model_type)
    if family is None:
        raise ValueError(
            f"No AIM adapter for model_type {model_type!r}; supported: {supported_model_types()}. "
            "To support another architecture, subclass PreTrainedModelForAIM and implement its "
            "hooks (README: 'Adding a model family'), then matt.modeling.registry.register_adapter(YourAdapter)."
        )
    return FAMILIES[family].adapter
