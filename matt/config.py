"""`MATTConfig`: every knob of an AIM transfer run, validated on construction.

A plain dataclass (not a Hydra structured config) so that the Python API has no Hydra dependency;
the Hydra `train/`, `objective/` and `data/` groups are mapped onto it by
`matt.pipeline.train.matt_config`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

AIM_IMPLS = ("aim", "aim_star", "hidden", "none")
LOSSES = ("mse", "cosine")
OUTPUT_EMBEDDINGS = ("tied", "keep_init", "ntp")
NTP_SCOPES = ("all", "head")
PRECISIONS = {
    "auto": "auto",
    "32": "no",
    "fp32": "no",
    "no": "no",
    "bf16-mixed": "bf16",
    "bf16": "bf16",
    "fp16-mixed": "fp16",
    "fp16": "fp16",
}


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


def resolve_mixed_precision(precision: str, *, cpu: bool = False) -> str:
    """Accelerate's `mixed_precision` value for a `precision` setting (`auto`: bf16 where native)."""
    value = PRECISIONS[precision]
    if value != "auto":
        return value
    return "bf16" if native_bf16(cpu) else "no"


@dataclass
class MATTConfig:
    """Configuration of one MATT run (training loop, objective, data, logging, checkpoints)."""

    # --- optimisation -------------------------------------------------------------------------
    max_steps: int = 1000
    """Optimizer steps (after gradient accumulation)."""
    max_wall_clock_s: float | None = None
    """Training-time budget in seconds (None = no budget): training stops at the first optimizer-step
    boundary past it (checkpointed like a finished run; the steps done are in the result's metrics).
    Gives a baseline the measured training time of another run (e.g. NTP at MATT's wall-clock)."""
    batch_size: int = 4
    """Examples per micro-batch (per process)."""
    gradient_accumulation_steps: int = 1
    gradient_clip_val: float | None = 1.0
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

    # --- objective ----------------------------------------------------------------------------
    loss: str = "mse"
    """`mse` (better for generation) or `cosine` (better for discrimination)."""
    aim_impl: str = "aim"
    """`aim` (pairwise segment influence), `aim_star` (attention output per segment), `hidden` (the
    AIM layer's output hidden state at each segment's last token, matched with `loss`: hidden-state
    distillation as in Token Distillation, Dobler et al. 2025) or `none` (no AIM term: the
    next-token-prediction baseline, requires `with_ntp`)."""
    with_ntp: bool = False
    """Add a next-token-prediction term (student at full depth), scaled to the AIM loss's size."""
    output_embeddings: str = "tied"
    """Output side of tied models: `tied` (LM head = AIM-trained input embeddings), `keep_init`
    (untie; LM head keeps the initialised student embeddings) or `ntp` (untie and train the LM
    head with the NTP term; needs `with_ntp`)."""
    ntp_scope: str = "all"
    """What the NTP term trains: `all` (input embeddings through every layer, and the LM head where it
    trains) or `head` (only the LM head, on detached final hidden states: the input embeddings learn
    from AIM alone and no backward pass runs through the layers above the AIM layer)."""

    # --- data ---------------------------------------------------------------------------------
    max_length: int = 512
    """Max tokens per example on either side; longer documents continue as further examples."""
    text_column: str = "text"
    dataset_cache_dir: str | None = None
    """Where prepared (segmented) datasets are cached; None = `~/.cache/matt/datasets`."""
    num_proc: int = 1
    """Processes for dataset preparation."""
    num_workers: int = 0
    """DataLoader workers."""
    shuffle: bool = True

    # --- hardware -----------------------------------------------------------------------------
    precision: str = "auto"
    """`auto`, `32`, `bf16-mixed` or `fp16-mixed` (through Accelerate's autocast). `auto` = bf16
    autocast where the hardware computes bf16 natively (bf16-capable GPUs; CPUs with AMX or
    AVX512-BF16), float32 elsewhere (see `native_bf16`). The AIM loss itself always runs in
    float32."""
    cpu: bool = False
    """Force CPU even when an accelerator is present."""

    # --- logging & checkpoints ----------------------------------------------------------------
    log_every_n_steps: int = 10
    save_every_n_steps: int = 0
    """Checkpoint cadence in optimizer steps (0 = only at the end, when `checkpoint_dir` is set)."""
    checkpoint_dir: str | None = None
    resume: bool = False
    """Continue from the last checkpoint in `checkpoint_dir` (optimizer, scheduler, RNG, data)."""
    progress_bar: bool = True

    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form metadata carried into logs (e.g. the Hydra job name)."""

    def __post_init__(self) -> None:
        self.adam_betas = tuple(self.adam_betas)  # OmegaConf hands lists
        if self.gradient_clip_val == 0:
            self.gradient_clip_val = None
        self.validate()

    # ------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise `ValueError` naming the first bad field and its allowed values."""

        def bad(name: str, allowed: str) -> None:
            raise ValueError(f"MATTConfig.{name}={getattr(self, name)!r} is invalid: {allowed}")

        for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "max_length", "num_proc"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(name, "must be a positive integer")
        for name in ("num_warmup_steps", "num_decay_steps", "num_workers", "save_every_n_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                bad(name, "must be a non-negative integer")
        if not isinstance(self.log_every_n_steps, int) or self.log_every_n_steps < 1:
            bad("log_every_n_steps", "must be a positive integer")
        if self.num_warmup_steps + self.num_decay_steps > self.max_steps:
            bad("num_warmup_steps", f"warmup + decay ({self.num_warmup_steps}+{self.num_decay_steps}) "
                f"must not exceed max_steps={self.max_steps}")
        if not self.lr > 0:
            bad("lr", "must be > 0")
        if self.weight_decay < 0:
            bad("weight_decay", "must be >= 0")
        if self.gradient_clip_val is not None and self.gradient_clip_val < 0:
            bad("gradient_clip_val", "must be >= 0 or None")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            bad("adam_betas", "must be two numbers in [0, 1)")
        if self.loss not in LOSSES:
            bad("loss", f"choose one of {LOSSES}")
        if self.aim_impl not in AIM_IMPLS:
            bad("aim_impl", f"choose one of {AIM_IMPLS}")
        if self.output_embeddings not in OUTPUT_EMBEDDINGS:
            bad("output_embeddings", f"choose one of {OUTPUT_EMBEDDINGS}")
        if self.ntp_scope not in NTP_SCOPES:
            bad("ntp_scope", f"choose one of {NTP_SCOPES}")
        if self.precision not in PRECISIONS:
            bad("precision", f"choose one of {sorted(PRECISIONS)}")
        if self.aim_impl == "none" and not self.with_ntp:
            bad("aim_impl", "'none' leaves no training signal; set with_ntp=True for the NTP baseline")
        if self.output_embeddings == "ntp" and not self.with_ntp:
            bad("output_embeddings", "'ntp' trains the LM head with the NTP term; set with_ntp=True")
        if self.ntp_scope == "head" and (not self.with_ntp or self.aim_impl == "none"):
            bad("ntp_scope", "'head' means AIM trains the input embeddings and NTP the LM head: it needs "
                "with_ntp=True and an AIM objective (aim_impl 'aim', 'aim_star' or 'hidden')")
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
        return dataclasses.asdict(self)

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
