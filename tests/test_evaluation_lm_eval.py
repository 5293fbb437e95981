"""lm-eval bridge: an offline local task on a tiny model, checked against our own log-likelihoods."""

from __future__ import annotations

import importlib.metadata
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from matt.evaluation import run_lm_eval, score_sequences
from matt.evaluation.lm_eval_bridge import INSTALL_HINT, flatten_results
from matt.tiny import tiny_model

TASKS_DIR = Path(__file__).parent / "data" / "lm_eval_tasks"


def test_missing_lm_eval_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` fail
    with pytest.raises(ImportError, match=r"pip install 'matt-tokenizer-transfer\[eval\]'"):
        run_lm_eval(object(), object(), ["belebele_ukr_Cyrl"])
    # the hint names this package and an extra of it that really brings lm-eval
    package, extra = re.fullmatch(r"pip install '([\w.-]+)\[(\w+)\]'", INSTALL_HINT).groups()
    requires = importlib.metadata.requires(package) or []
    assert any(r.startswith("lm-eval") and f'extra == "{extra}"' in r for r in requires), requires


def test_bad_task_lists_are_rejected_before_any_work():
    with pytest.raises(TypeError, match="list of task names"):
        run_lm_eval(object(), object(), "belebele_ukr_Cyrl")
    with pytest.raises(ValueError, match="at least one task"):
        run_lm_eval(object(), object(), [])


def test_flatten_results():
    output = {
        "results": {
            "task_a": {"alias": "task_a", "acc,none": 0.5, "acc_stderr,none": "N/A", "exact_match,strict-match": 0.25},
            "group_g": {"alias": "group_g", "acc,none": 0.4},
        },
        "groups": {"group_g": {"acc,none": 0.4, "acc_stderr,none": 0.01}},
    }
    assert flatten_results(output) == {
        "task_a/acc": 0.5, "task_a/exact_match/strict-match": 0.25, "group_g/acc": 0.4, "group_g/acc_stderr": 0.01}


def independent_accuracies(model, tokenizer, docs) -> tuple[float, float]:
    """acc and acc_norm from our own scorer, with lm-eval's documented request format: the
    continuation is " " + choice; context tokens are the tokenizer's default encoding of the
    context, continuation tokens what follows them in the encoding of context + continuation;
    acc_norm divides the log-likelihood by the choice's length in characters."""
    acc = acc_norm = 0
    for doc in docs:
        context_ids = tokenizer(doc["context"])["input_ids"]
        sequences = [tokenizer(doc["context"] + " " + choice)["input_ids"] for choice in doc["choices"]]
        assert all(seq[: len(context_ids)] == context_ids for seq in sequences)
        loglik = -np.array(score_sequences(model, sequences, [len(context_ids)] * len(sequences), progress=False))
        lengths = np.array([len(choice) for choice in doc["choices"]], dtype=float)
        acc += int(np.argmax(loglik) == doc["label"])
        acc_norm += int(np.argmax(loglik / lengths) == doc["label"])
    return acc / len(docs), acc_norm / len(docs)


def test_local_task_accuracy_equals_our_own_log_likelihoods(byte_level_tokenizer, monkeypatch):
    pytest.importorskip("lm_eval", reason="lm-eval is the optional `eval` extra: " + INSTALL_HINT)
    import datasets.config
    import huggingface_hub.constants

    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)

    docs = [json.loads(line) for line in (TASKS_DIR / "local_choice.jsonl").read_text().splitlines()]
    assert len(docs) == 8
    model = tiny_model("qwen3", len(byte_level_tokenizer), seed=0)
    with torch.no_grad():  # sharpen the random model so its choices depend on more than token counts
        model.lm_head.weight.mul_(40)
    result = run_lm_eval(model, byte_level_tokenizer, ["matt_local_choice"], include_path=str(TASKS_DIR),
                         batch_size=3, device="cpu")
    acc, acc_norm = independent_accuracies(model, byte_level_tokenizer, docs)
    assert result["matt_local_choice/acc"] == pytest.approx(acc)
    assert result["matt_local_choice/acc_norm"] == pytest.approx(acc_norm)
    assert "matt_local_choice/acc_stderr" in result
    assert not model.training

