"""Devices a test can run on: CPU always, CUDA as a `cuda`-marked variant (`make gpu-check` runs them).

Without a GPU the CUDA variants are reported as skipped, never as passed."""

from __future__ import annotations

import pytest
import torch

CUDA = pytest.param("cuda", marks=[pytest.mark.cuda,
                                   pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")])
DEVICES = ["cpu", CUDA]
