"""The teacher model from the `model` group: a local directory, a hub id, or a tiny random model.

Tiny models (`model.tiny` set) are built from their family's real config class with
`matt.tiny`; their teacher tokenizer is trained in-process on `matt.tiny.SAMPLE_TEXTS`, so the
same config always gives the same tokenizer and (with `tiny.seed`) the same weights.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def _tiny_dims(tiny) -> dict[str, int]:
    names = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size")
    return {name: tiny[name] for name in names}


@functools.lru_cache(maxsize=8)
def _tiny_tokenizer(style: str, vocab_size: int):
    from matt.tiny import SAMPLE_TEXTS, train_tokenizer

    return train_tokenizer(SAMPLE_TEXTS * 4, vocab_size=vocab_size, style=style)


def model_source(model_cfg) -> str:
    """Where the weights come from (for messages and cache keys)."""
    if model_cfg.tiny is not None:
        return f"tiny:{model_cfg.family}"
    if not model_cfg.pretrained:
        raise ValueError(f"model.pretrained is not set for model {model_cfg.name!r}: give a local model "
                         "directory or a hub id (or use a tiny_* model)")
    return str(model_cfg.pretrained)


def load_teacher_tokenizer(model_cfg):
    """The teacher's tokenizer (`model.tokenizer`, default `model.pretrained`)."""
    if model_cfg.tiny is not None:
        return _tiny_tokenizer(str(model_cfg.tiny.tokenizer_style), model_cfg.tiny.tokenizer_vocab_size)
    from transformers import AutoTokenizer

    source = model_cfg.tokenizer or model_source(model_cfg)
    return AutoTokenizer.from_pretrained(source, revision=model_cfg.revision,
                                         trust_remote_code=model_cfg.trust_remote_code)


def load_model_config(model_cfg, teacher_tokenizer):
    """The model's transformers config without loading weights (cheap; for validation)."""
    if model_cfg.tiny is not None:
        from matt.tiny import tiny_config

        return tiny_config(model_cfg.family, len(teacher_tokenizer), **_tiny_dims(model_cfg.tiny))
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_source(model_cfg), revision=model_cfg.revision,
                                      trust_remote_code=model_cfg.trust_remote_code)


def load_teacher_model(model_cfg, teacher_tokenizer):
    """A fresh copy of the full teacher (eval mode). Called again whenever an untouched copy is needed."""
    if model_cfg.tiny is not None:
        from matt.tiny import tiny_model

        return tiny_model(model_cfg.family, len(teacher_tokenizer), seed=model_cfg.tiny.seed,
                          **_tiny_dims(model_cfg.tiny))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_source(model_cfg), dtype=DTYPES[model_cfg.dtype],
                                                 revision=model_cfg.revision,
                                                 trust_remote_code=model_cfg.trust_remote_code)
    return model.eval()


def model_identity(model_cfg) -> dict[str, Any]:
    """What determines the teacher's weights, for cache keys (a local directory adds the size and
    modification time of its files, so replaced weights invalidate caches)."""
    identity: dict[str, Any] = {"source": model_source(model_cfg), "revision": model_cfg.revision,
                                "dtype": model_cfg.dtype}
    if model_cfg.tiny is not None:
        identity["tiny"] = {**_tiny_dims(model_cfg.tiny), "seed": model_cfg.tiny.seed,
                            "style": str(model_cfg.tiny.tokenizer_style),
                            "vocab": model_cfg.tiny.tokenizer_vocab_size}
    else:
        path = Path(str(model_cfg.pretrained)).expanduser()
        if path.is_dir():
            identity["files"] = sorted((f.name, f.stat().st_size, int(f.stat().st_mtime))
                                       for f in path.iterdir() if f.is_file())
    return identity

