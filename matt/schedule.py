"""Warmup–stable–decay learning-rate schedule (the original library's `num_warmup_steps` / `num_decay_steps`)."""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def wsd_factor(step: int, max_steps: int, num_warmup_steps: int, num_decay_steps: int) -> float:
    """LR multiplier for optimizer update `step` (0-based).

    Warm-up ramps linearly to 1 over the first `num_warmup_steps` updates (the first update already
    moves: factor 1/W), the stable phase holds 1, and decay falls linearly over the last
    `num_decay_steps` updates to 1/D at the final one. A phase of length 0 is disabled.
    transformers' `get_wsd_schedule` (linear) agrees except that its warm-up starts at 0: the first
    update would not move (tests/test_config_schedule.py compares the two).
    """
    if num_warmup_steps > 0 and step < num_warmup_steps:
        return (step + 1) / num_warmup_steps
    decay_start = max_steps - num_decay_steps
    if num_decay_steps > 0 and step >= decay_start:
        return max(0.0, (max_steps - step) / num_decay_steps)
    return 1.0


def wsd_scheduler(optimizer: Optimizer, max_steps: int, num_warmup_steps: int = 0,
                  num_decay_steps: int = 0) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: wsd_factor(step, max_steps, num_warmup_steps, num_decay_steps))
