"""Folded into `experiments/transfer.py` (adapters), `run_context` (Accelerator) and `config` (MATTConfig);
only `matt.pipeline.probe`'s import of `dataset_cache_dir` still comes through here."""

from matt.pipeline.config import dataset_cache_dir  # noqa: F401
