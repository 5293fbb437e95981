"""95 % confidence intervals for accuracies and for differences between models on the same items.

The bootstraps resample items (or documents) and keep the pairing: both models answer the same
questions, so item difficulty cancels and the interval is much tighter than two independent
intervals; "significant" means it excludes 0. Comparing two Wilson intervals for overlap is the
conservative fallback when per-item scores are missing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np


def z_value(confidence: float) -> float:
    """Two-sided standard-normal quantile (1.96 for 0.95)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of `successes` out of `n` (successes may be fractional: split credit for ties).

    Unlike the normal approximation it stays inside [0, 1] and keeps its coverage near 0 and 1 and
    for small n. centre = (p + z²/2n) / (1 + z²/n), half-width = z·sqrt(p(1-p)/n + z²/4n²) / (1 + z²/n).
    """
    if n < 1:
        raise ValueError(f"An interval needs n >= 1 items, got {n}")
    if not 0.0 <= successes <= n:
        raise ValueError(f"successes must be in [0, n={n}], got {successes}")
    z = z_value(confidence)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class PairedDifference:
    """mean(a) - mean(b) over the same items with its bootstrap interval."""

    difference: float
    low: float
    high: float
    n: int

    @property
    def significant(self) -> bool:
        """The interval excludes 0 (ties with the bound count as not significant)."""
        return self.low > 0.0 or self.high < 0.0


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, confidence: float = 0.95,
                     num_resamples: int = 10_000, seed: int = 0) -> PairedDifference:
    """Percentile bootstrap of mean(a_i - b_i) over the same items: `ratio_bootstrap` with every
    item weighing 1."""
    a = np.asarray(a, dtype=np.float64)
    return ratio_bootstrap(a, np.ones_like(a), b, confidence=confidence, num_resamples=num_resamples, seed=seed)


def ratio_bootstrap(a: Sequence[float], weights: Sequence[float], b: Sequence[float] | None = None, *,
                    confidence: float = 0.95, num_resamples: int = 10_000, seed: int = 0) -> PairedDifference:
    """Percentile bootstrap of Σa_i/Σw_i − Σb_i/Σw_i over units i (b = 0 when not given).

    For bits per byte the units are documents: a_i and b_i the bits two models need for document
    i, w_i its bytes, so the result is the bits-per-byte difference (or, without b, one model's
    bits per byte) with an interval that resamples whole documents — the honest unit, since
    tokens of one document are not independent. `num_resamples` resamples of the n units with
    replacement (numpy's default generator seeded with `seed`, one `integers(0, n, size=(R, n))`
    draw); interval = the (1-confidence)/2 and (1+confidence)/2 quantiles of the resampled values.
    """
    a = np.asarray(a, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    b = np.zeros_like(a) if b is None else np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.shape != weights.shape or a.ndim != 1:
        raise ValueError(f"Paired scores and weights must be vectors over the same items (units), got shapes "
                         f"{a.shape}, {b.shape} and {weights.shape}")
    if a.size == 0:
        raise ValueError("A bootstrap needs at least one unit")
    if num_resamples < 1:
        raise ValueError(f"num_resamples must be >= 1, got {num_resamples}")
    if (weights <= 0).any():
        raise ValueError("Every unit needs a positive weight (e.g. its bytes)")
    z_value(confidence)  # validates confidence
    differences = a - b
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, a.size, size=(num_resamples, a.size))
    resampled = differences[draws].sum(axis=1) / weights[draws].sum(axis=1)
    low, high = np.quantile(resampled, [(1 - confidence) / 2, (1 + confidence) / 2])
    return PairedDifference(float(differences.sum() / weights.sum()), float(low), float(high), int(a.size))


def intervals_overlap(first: tuple[float, float], second: tuple[float, float]) -> bool:
    """Whether two intervals share a point (then their difference is not called significant)."""
    return first[0] <= second[1] and second[0] <= first[1]
