"""`MATTConfig`: every knob of an AIM transfer run, validated on construction.

Its fields come from three groups, each a plain dataclass that is also the schema (or the base of the
schema) of the Hydra group of the same name: `TrainSettings` = `train`, `ObjectiveSettings` <
`objective`, `DataSettings` < `data` (see `matt.pipeline.config`). `MATTConfig` inherits all three, so
the Python API takes flat keywords (`MATTConfig(lr=1e-3, loss="cosine")`) while every field still
belongs to one group, and a validation error names the Hydra key (`train.lr=-1 is invalid: ...`).
No Hydra dependency here.

No `from __future__ import annotations`: OmegaConf reads these annotations at runtime.
"""

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from matt.choices import AimImpl, Choice, Loss, NtpScope, OutputMode, Precision, accelerate_precision

ONEDNN_CACHE_CAPACITY = 64
"""Entries kept by each of oneDNN's shape-keyed kernel caches (see `bound_onednn_caches`)."""


def bound_onednn_caches(capacity: int = ONEDNN_CACHE_CAPACITY) -> None:
    """Cap the two caches of compiled CPU kernels behind torch's bf16 (oneDNN) matmuls.

    Each new input shape compiles and caches a kernel with its scratch memory: oneDNN's primitive
    cache and ideep's LRU cache, 1024 entries each by default. Training on documents of varying
    length under bf16 autocast meets a new shape almost every step, so the resident set grew by
    ~4 MB per step on a tiny model (550 MB -> 1.4 GB in 300 steps; flat in float32 and with fixed
    shapes). With both caches capped it stays flat. Both are read when the first oneDNN kernel is
    built, so this runs on `import matt`; a value already in the environment is kept."""
    import os

    for name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        os.environ.setdefault(name, str(capacity))


def native_bf16(cpu: bool = False) -> bool:
    """Whether the device training will run on computes bf16 natively (then bf16 autocast is faster).

    A CUDA GPU with bf16 support, or (on CPU) AMX / AVX512-BF16 units. Measured on a 2-core AMX
    Xeon (`make bench`): the MATT step 1.66x faster under bf16 autocast, first-step AIM loss within
    9e-4 (relative), the demo's held-out bits per byte 1.3564 vs 1.3563 in float32."""
    import torch

    if not cpu and torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    checks = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(check() for check in checks if check is not None)


def resolve_mixed_precision(precision, *, cpu: bool = False) -> str:
    """Accelerate's `mixed_precision` value for a `precision` setting (`auto`: bf16 where native)."""
    value = accelerate_precision(precision)
    if value != "auto":
        return value
    return "bf16" if native_bf16(cpu) else "no"


@dataclass
class TrainSettings:
    """The optimisation loop, logging and checkpoints: the Hydra `train` group (`train.<field>`)."""

    max_steps: int = 1000
    """Optimizer steps (after gradient accumulation)."""
    max_wall_clock_s: Optional[float] = None
    """Training-time budget in seconds (None = no budget): training stops at the first optimizer-step
    boundary past it (checkpointed like a finished run; the steps done are in the result's metrics as
    `train/final_steps`). Gives a baseline the measured training time of another run (e.g. NTP at
    MATT's wall-clock)."""
    batch_size: int = 4
    """Examples per micro-batch (per process)."""
    gradient_accumulation_steps: int = 1
    gradient_clip_val: Optional[float] = 1.0
    """Max global grad norm; None or 0 disables clipping."""
    lr: float = 1e-4
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    num_warmup_steps: int = 0
    """Linear warm-up from 0 to `lr` (0 disables the phase)."""
    num_decay_steps: int = 0
    """Linear decay to 0 over the last steps (0 disables the phase)."""
    seed: int = 42
    precision: Precision = Precision.auto
    """`auto` (the default), `32`, `bf16-mixed` or `fp16-mixed` (through Accelerate's autocast). `auto`
    = bf16 autocast where the hardware computes bf16 natively (bf16-capable GPUs; CPUs with AMX or
    AVX512-BF16), float32 elsewhere (see `native_bf16`). The AIM loss itself always runs in float32."""
    cpu: bool = False
    """Force CPU even when an accelerator is present."""
    log_every_n_steps: int = 10
    save_every_n_steps: int = 100
    """Checkpoint cadence in optimizer steps, when there is a checkpoint directory (0 = only at the
    end). The pipeline always has one (the job's output directory); the Python API has one when
    `checkpoint_dir` is set."""
    num_workers: int = 0
    """DataLoader workers."""
    shuffle: bool = True
    progress_bar: bool = True
    resume: bool = False
    """Continue from the last checkpoint (optimizer, scheduler, RNG, data position): the one in
    `checkpoint_dir` (Python API) or in the job's output directory, with its MLflow run (pipeline)."""


@dataclass
class ObjectiveSettings:
    """What trains the student's embeddings: the Hydra `objective` group (`objective.<field>`)."""

    aim_impl: AimImpl = AimImpl.aim
    """See `AimImpl`; `none` requires `with_ntp`."""
    loss: Loss = Loss.mse
    with_ntp: bool = False
    """Add a next-token-prediction term (student at full depth), scaled to the AIM loss's size."""
    output_embeddings: OutputMode = OutputMode.tied
    """Output side of tied models (ignored for untied ones), see `OutputMode`; `ntp` needs `with_ntp`."""
    ntp_scope: NtpScope = NtpScope.all
    """See `NtpScope`; `head` needs `with_ntp` and an AIM term (the input embeddings then learn from
    AIM alone and no backward pass runs through the layers above the AIM layer)."""
    ntp_max_tokens: Optional[int] = None
    """Score the NTP term on at most this many randomly drawn target positions per micro-batch
    (None = all): an unbiased estimate of the mean loss whose LM-head cost stops growing with the
    batch (on a 262K vocabulary the head's one product per scored token with every row dominates)."""


@dataclass
class DataSettings:
    """How documents become training examples: part of the Hydra `data` group (`data.<field>`)."""

    max_length: int = 512
    """Max tokens per example on either side; longer documents continue as further examples."""
    text_column: str = "text"
    num_proc: int = 1
    """Processes for dataset preparation."""
    cache_dir: Optional[str] = None
    """Where prepared (segmented) datasets are cached; None = `~/.cache/matt/datasets` (the pipeline:
    `${paths.cache_dir}/datasets`)."""


GROUPS = {"train": TrainSettings, "objective": ObjectiveSettings, "data": DataSettings}
"""The Hydra group of each settings class: a `MATTConfig` field `f` of group `g` is the key `g.f`."""


def hydra_key(name: str) -> str:
    """The Hydra key of a `MATTConfig` field (`lr` -> `train.lr`); fields outside the groups as they are."""
    return next((f"{group}.{name}" for group, cls in GROUPS.items() if name in cls.__dataclass_fields__), name)


@dataclass
class MATTConfig(DataSettings, ObjectiveSettings, TrainSettings):  # fields: train, objective, data
    """Configuration of one MATT run: the fields of `TrainSettings`, `ObjectiveSettings` and
    `DataSettings` (flat keywords), plus where checkpoints go and free-form metadata."""

    checkpoint_dir: Optional[str] = None
    """Checkpoints (and `resume`) live here; None = no checkpoints."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form metadata carried into logs (e.g. the Hydra job name)."""

    def __post_init__(self) -> None:
        self.adam_betas = tuple(self.adam_betas)  # OmegaConf hands lists
        if self.gradient_clip_val == 0:
            self.gradient_clip_val = None
        for f in dataclasses.fields(self):  # plain strings (or a CLI's 32) become members
            if isinstance(f.type, type) and issubclass(f.type, Choice):
                setattr(self, f.name, f.type.parse(getattr(self, f.name), hydra_key(f.name)))
        self.validate()

    # ------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise `ValueError` naming the first bad field by its Hydra key, with its allowed values."""

        def bad(name: str, allowed: str) -> None:
            value = getattr(self, name)
            value = value.value if isinstance(value, Enum) else value
            raise ValueError(f"{hydra_key(name)}={value!r} is invalid: {allowed}")

        for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "max_length", "num_proc",
                     "log_every_n_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(name, "must be a positive integer")
        for name in ("num_warmup_steps", "num_decay_steps", "num_workers", "save_every_n_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                bad(name, "must be a non-negative integer")
        if self.num_warmup_steps + self.num_decay_steps > self.max_steps:
            bad("num_warmup_steps", f"warmup + decay ({self.num_warmup_steps}+{self.num_decay_steps}) "
                f"must not exceed train.max_steps={self.max_steps}")
        if not self.lr > 0:
            bad("lr", "must be > 0")
        if self.weight_decay < 0:
            bad("weight_decay", "must be >= 0")
        if self.gradient_clip_val is not None and self.gradient_clip_val < 0:
            bad("gradient_clip_val", "must be >= 0 or None")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            bad("adam_betas", "must be two numbers in [0, 1)")
        if self.aim_impl == AimImpl.none and not self.with_ntp:
            bad("aim_impl", "'none' leaves no training signal; set objective.with_ntp=true for the NTP baseline")
        if self.output_embeddings == OutputMode.ntp and not self.with_ntp:
            bad("output_embeddings", "'ntp' trains the LM head with the NTP term; set objective.with_ntp=true")
        if self.ntp_max_tokens is not None and self.ntp_max_tokens < 1:
            bad("ntp_max_tokens", f"must be >= 1 or None (all positions), got {self.ntp_max_tokens}")
        if self.ntp_scope == NtpScope.head and (not self.with_ntp or self.aim_impl == AimImpl.none):
            bad("ntp_scope", "'head' means AIM trains the input embeddings and NTP the LM head: it needs "
                "objective.with_ntp=true and an AIM term (aim_impl 'aim', 'aim_star' or 'hidden')")
        if self.max_wall_clock_s is not None and not self.max_wall_clock_s > 0:
            bad("max_wall_clock_s", "must be > 0 seconds, or None for no budget")
        if self.resume and not self.checkpoint_dir:
            bad("resume", "resuming needs checkpoint_dir")

    @property
    def mixed_precision(self) -> str:
        """The value Accelerate's `mixed_precision` expects (`auto` resolved for this machine)."""
        return resolve_mixed_precision(self.precision, cpu=self.cpu)

    @property
    def accumulate_grad_batches(self) -> int:
        """Alias kept for users of the original (Lightning) library."""
        return self.gradient_accumulation_steps

    def to_dict(self) -> dict[str, Any]:
        """Plain values (choices as strings): safe for JSON and for `torch.load(weights_only=True)`."""
        return {k: v.value if isinstance(v, Enum) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "MATTConfig":
        """Build from a mapping, rejecting unknown keys by name (typos must not pass silently)."""
        values = dict(values)
        if "accumulate_grad_batches" in values:
            values["gradient_accumulation_steps"] = values.pop("accumulate_grad_batches")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown MATTConfig key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**values)
