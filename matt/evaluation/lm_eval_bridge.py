"""Run lm-evaluation-harness tasks on a model that is already in memory (e.g. just adapted).

The in-house metrics (BPB, multiple choice, chrF) need no labelled data and work offline; public
benchmarks are what papers report. lm-eval is an optional dependency (`eval` extra) because it
pulls in many packages and its tasks download data from the Hugging Face Hub, so this module
imports it only when called.

Ukrainian paper tasks (need Hub access): `belebele_ukr_Cyrl` (Belebele, 4-way multiple choice) and
`global_mmlu_full_uk` (Global-MMLU, a group of 57 subjects; also per category, e.g. `..._stem`);
zero-shot unless `num_fewshot` is given. Offline, local task YAMLs (with a local dataset) are found
through `include_path`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'matt-tokenizer-transfer[eval]'"


def run_lm_eval(model: torch.nn.Module, tokenizer, tasks: list[str], *, include_path: str | None = None,
                num_fewshot: int | None = None, limit: int | None = None, batch_size: int = 4,
                device: str | None = None, hflm_kwargs: Mapping[str, Any] | None = None) -> dict[str, float]:
    """Evaluate `model` with `tokenizer` on lm-eval `tasks`; returns `{"task/metric": value}`.

    The model is wrapped as it is (lm-eval's `HFLM` with a pre-loaded model), so an adapted model
    needs no saving first. `device`: if given, the model is moved there (in place) before
    evaluating; otherwise it stays where it is. `include_path`: a directory of extra task YAMLs.
    `limit`: at most this many examples per task (for quick checks; not a valid benchmark number).
    `hflm_kwargs`: further `HFLM` options, e.g. `{"add_bos_token": True, "max_length": 2048}`
    (by default the tokenizer's own special-token behaviour is used). As with lm-eval itself, a
    tokenizer without a pad token gets one set.

    Metric keys follow lm-eval's names with its filter suffix dropped when it is the default
    "none" (`"belebele_ukr_Cyrl/acc"`, `"belebele_ukr_Cyrl/acc_stderr"`) and kept after a slash
    otherwise (`"gsm8k/exact_match/strict-match"`), since MLflow rejects lm-eval's commas. Group
    tasks contribute their aggregated metrics too. Non-numeric entries ("N/A" stderrs) are left
    out.
    """
    if isinstance(tasks, str):
        raise TypeError(f"tasks must be a list of task names, not the string {tasks!r}")
    tasks = list(tasks)
    if not tasks:
        raise ValueError("run_lm_eval needs at least one task name")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise ImportError(f"run_lm_eval needs lm-evaluation-harness, which is not installed ({error}). Install the "
                          f"optional evaluation extra: {INSTALL_HINT}") from error
    if device is not None:
        model.to(device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **dict(hflm_kwargs or {}))
    task_manager = TaskManager(include_path=include_path)
    was_training = model.training
    try:
        output = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                         task_manager=task_manager, log_samples=False)
    finally:
        model.train(was_training)
    if output is None:  # non-zero rank of a distributed run: results live on rank 0
        return {}
    return flatten_results(output)


def flatten_results(output: Mapping[str, Any]) -> dict[str, float]:
    """`simple_evaluate`'s nested results (tasks and groups) as flat `{"task/metric": value}`."""
    flat: dict[str, float] = {}
    for section in ("results", "groups"):
        for task, metrics in (output.get(section) or {}).items():
            for name, value in metrics.items():
                if name == "alias" or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                metric, _, filter_name = name.partition(",")
                key = f"{task}/{metric}" if filter_name in ("", "none") else f"{task}/{metric}/{filter_name}"
                if not math.isnan(float(value)) or key not in flat:
                    flat[key] = float(value)
    return flat
