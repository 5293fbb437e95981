"""The choices of a MATT run, each declared once as a string-valued Enum.

Members are `str`s: `Loss.mse == "mse"`, `str(Loss.mse) == "mse"`, and a plain string is accepted
wherever a member is (`MATTConfig(loss="cosine")`, `aim_loss(..., loss="cosine")`). The Hydra schemas
type their fields with these classes, so OmegaConf rejects a value outside them while composing,
naming the key and the allowed names (the names are what users type: `objective.loss=cosine`).
"""

from __future__ import annotations

from enum import Enum
from typing import Any, TypeVar

C = TypeVar("C", bound="Choice")


class Choice(str, Enum):
    """Base of the choices: prints as its value; also accepts a member's name (aliases included)."""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def _missing_(cls, value: Any):
        return cls.__members__.get(str(value))  # a name or alias (`Precision("bf16")`), or 32 from a CLI

    @classmethod
    def parse(cls: type[C], value: Any, key: str) -> C:
        """`value` as a member; `ValueError` naming `key` and the allowed values otherwise."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"{key}={value!r} is invalid: choose one of {list(cls.__members__)}") from None


class AimImpl(Choice):
    """The distillation term: `aim` (pairwise segment influence), `aim_star` (attention output per
    segment), `hidden` (the AIM layer's output hidden state at segment ends, the Token Distillation
    baseline) or `none` (no distillation term: the next-token-prediction baseline)."""

    aim = "aim"
    aim_star = "aim_star"
    hidden = "hidden"
    none = "none"


class Loss(Choice):
    """Distance of the distillation term: `mse` (better for generation) or `cosine` (1 − cos)."""

    mse = "mse"
    cosine = "cosine"


class OutputMode(Choice):
    """Output side of a tied model: `tied` (LM head = the trained input embeddings), `keep_init`
    (untied, the head keeps the initial rows) or `ntp` (untied, the head trained by the NTP term)."""

    tied = "tied"
    keep_init = "keep_init"
    ntp = "ntp"


class NtpScope(Choice):
    """What the NTP term trains: `all` (input embeddings through every layer, and the LM head where
    it trains) or `head` (only the LM head, on detached final hidden states)."""

    all = "all"
    head = "head"


Precision = Choice("Precision", [  # names are the spellings accepted; repeated values are aliases
    ("auto", "auto"), ("32", "32"), ("fp32", "32"), ("no", "32"),
    ("bf16-mixed", "bf16-mixed"), ("bf16", "bf16-mixed"), ("fp16-mixed", "fp16-mixed"), ("fp16", "fp16-mixed"),
], module=__name__, qualname="Precision")
"""Training precision: `auto` (bf16 autocast where the hardware computes bf16 natively, else float32),
`32` (float32; also `fp32`, `no`), `bf16-mixed` (also `bf16`) or `fp16-mixed` (also `fp16`)."""


def accelerate_precision(precision: Any) -> str:
    """Accelerate's `mixed_precision` spelling of a precision (`auto` passes through unresolved)."""
    value = Precision(precision).value
    return {"32": "no", "auto": "auto"}.get(value, value.removesuffix("-mixed"))
