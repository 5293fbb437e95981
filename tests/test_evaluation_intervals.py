"""Confidence intervals: Wilson against hand-computed values, the paired bootstrap against a literal loop."""

from __future__ import annotations

import math

import numpy as np
import pytest

from matt.evaluation.intervals import (PairedDifference, intervals_overlap, paired_bootstrap, ratio_bootstrap,
                                     wilson_interval, z_value)


def test_z_value():
    assert z_value(0.95) == pytest.approx(1.959964, abs=1e-6)
    with pytest.raises(ValueError, match="confidence"):
        z_value(1.0)


@pytest.mark.parametrize(("successes", "n", "low", "high"), [
    # Hand-computed: (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n), z = 1.959964.
    (8, 10, 0.490162, 0.943314),
    (0, 10, 0.0, 0.277533),
    (100, 400, 0.210079, 0.294677),
    (10, 10, 0.722467, 1.0),
])
def test_wilson_interval_by_hand(successes, n, low, high):
    got = wilson_interval(successes, n)
    assert got == pytest.approx((low, high), abs=1e-5)


def test_wilson_interval_accepts_split_credit_and_rejects_bad_input():
    low, high = wilson_interval(2.5, 10)
    assert low < 0.25 < high
    with pytest.raises(ValueError, match="n >= 1"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(11, 10)


def literal_paired_bootstrap(a, b, num_resamples, seed, confidence=0.95):
    """Resample item indices one resample at a time; the same generator stream as one (R, n) draw."""
    rng = np.random.default_rng(seed)
    n = len(a)
    indices = rng.integers(0, n, size=(num_resamples, n))
    means = []
    for r in range(num_resamples):
        means.append(sum(a[i] - b[i] for i in indices[r]) / n)
    means.sort()
    # numpy's default quantile: linear interpolation at position q * (R - 1).
    def quantile(q):
        position = q * (num_resamples - 1)
        lower = math.floor(position)
        upper = min(lower + 1, num_resamples - 1)
        return means[lower] + (position - lower) * (means[upper] - means[lower])
    return quantile((1 - confidence) / 2), quantile((1 + confidence) / 2)


def test_paired_bootstrap_matches_a_literal_loop():
    rng = np.random.default_rng(5)
    a = (rng.random(60) < 0.6).astype(float).tolist()
    b = (rng.random(60) < 0.4).astype(float).tolist()
    got = paired_bootstrap(a, b, num_resamples=500, seed=3)
    low, high = literal_paired_bootstrap(a, b, 500, 3)
    assert got.difference == pytest.approx(sum(a) / 60 - sum(b) / 60)
    assert (got.low, got.high) == pytest.approx((low, high))
    assert got.n == 60


def test_paired_bootstrap_significance():
    same = [1.0, 0.0, 1.0, 0.25] * 50
    tie = paired_bootstrap(same, same)
    assert (tie.difference, tie.low, tie.high, tie.significant) == (0.0, 0.0, 0.0, False)
    # 200 items, model a right on 30 more of them than b and never worse: a clear, paired win.
    a = [1.0] * 130 + [0.0] * 70
    b = [1.0] * 100 + [0.0] * 100
    win = paired_bootstrap(a, b)
    assert win.significant and win.low > 0 and win.difference == pytest.approx(0.15)
    # The same accuracies, but the disagreements go both ways 60 : 30 - the paired interval is wider.
    c = [1.0] * 70 + [1.0] * 60 + [0.0] * 70
    d = [1.0] * 70 + [0.0] * 60 + [1.0] * 30 + [0.0] * 40
    mixed = paired_bootstrap(c, d)
    assert mixed.difference == pytest.approx(0.15)
    assert (mixed.high - mixed.low) > (win.high - win.low)
    assert not PairedDifference(0.1, -0.01, 0.2, 10).significant
    assert PairedDifference(-0.1, -0.2, -0.01, 10).significant


def test_paired_bootstrap_rejects_unpaired_input():
    with pytest.raises(ValueError, match="same items"):
        paired_bootstrap([1.0, 0.0], [1.0])
    with pytest.raises(ValueError, match="at least one"):
        paired_bootstrap([], [])


def test_intervals_overlap():
    assert intervals_overlap((0.1, 0.3), (0.3, 0.5))
    assert not intervals_overlap((0.1, 0.29), (0.3, 0.5))


def test_ratio_bootstrap_matches_a_literal_loop_over_documents():
    """Σ bits / Σ bytes per resample of whole documents, against a loop over the same index draws."""
    rng = np.random.default_rng(7)
    nbytes = rng.integers(200, 5000, size=12).astype(float)
    a = nbytes * rng.uniform(0.9, 1.3, size=12)   # bits of model a per document
    b = nbytes * rng.uniform(1.0, 1.4, size=12)
    got = ratio_bootstrap(a, nbytes, b, num_resamples=400, seed=2)
    draws = np.random.default_rng(2).integers(0, 12, size=(400, 12))
    values = sorted(sum(a[i] - b[i] for i in row) / sum(nbytes[i] for i in row) for row in draws)
    position = 0.025 * 399
    low = values[math.floor(position)] + (position - math.floor(position)) * (values[math.floor(position) + 1] - values[math.floor(position)])
    position = 0.975 * 399
    high = values[math.floor(position)] + (position - math.floor(position)) * (values[math.floor(position) + 1] - values[math.floor(position)])
    assert got.difference == pytest.approx(a.sum() / nbytes.sum() - b.sum() / nbytes.sum())
    assert (got.low, got.high) == pytest.approx((low, high))
    alone = ratio_bootstrap(a, nbytes, num_resamples=400, seed=2)  # one model's bits per byte
    assert alone.difference == pytest.approx(a.sum() / nbytes.sum())
    assert alone.low < alone.difference < alone.high


def test_ratio_bootstrap_pairing_and_errors():
    nbytes = [1000.0, 3000.0, 500.0, 2000.0] * 5
    # b needs 5 % more bits than a on every document: paired, that is a certain win however much
    # the documents themselves differ in difficulty.
    a = [n * (0.8 + 0.1 * k) for k, n in enumerate(nbytes)]
    b = [x * 1.05 for x in a]
    win = ratio_bootstrap(a, nbytes, b)
    assert win.significant and win.high < 0
    assert not ratio_bootstrap(a, nbytes, a).significant
    with pytest.raises(ValueError, match="same items"):
        ratio_bootstrap([1.0, 2.0], [1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="positive weight"):
        ratio_bootstrap([1.0, 2.0], [1.0, 0.0])
