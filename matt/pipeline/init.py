"""The student's initial embeddings from the `init` group: focus | mean | random | subword_mean | checkpoint.

The initial embeddings are stored as a `TransferResult` (`<output_dir>/init/embeddings.safetensors`)
together with the key of what produced them. A resumed job, and every non-main process of a
distributed launch, loads them from there instead of recomputing, so all of them train from the
same starting point (FOCUS's fastText is only reproducible single-threaded).
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import torch

from matt.digests import cache_key, tokenizer_fingerprint
from matt.initialization import build_student_model, set_special_token_ids
from matt.pipeline.models import load_teacher_model
from matt.result import TransferResult
from matt.tracking import numeric_metrics

logger = logging.getLogger(__name__)

INIT_DIR = "init"
KEY_FILE = "init_key.json"


def embeddings_of(model) -> TransferResult:
    """A model's current embeddings as a `TransferResult` (untied LM head included)."""
    inputs = model.get_input_embeddings().weight.detach().float().cpu().clone()
    head = model.get_output_embeddings()
    tied = head is None or head.weight is model.get_input_embeddings().weight
    outputs = None if tied else head.weight.detach().float().cpu().clone()
    return TransferResult(input_embeddings=inputs, output_embeddings=outputs, tie_word_embeddings=tied)


def with_embeddings(model, embeddings: TransferResult, student_tokenizer):
    """`model` (changed in place) carrying `embeddings` and the student tokenizer's special-token ids."""
    embeddings.apply_to(model)
    set_special_token_ids(model, student_tokenizer)
    return model


def adapted_model(model_cfg, teacher_tokenizer, embeddings: TransferResult, student_tokenizer):
    """A freshly loaded full-depth teacher carrying `embeddings` and the student's special-token ids:
    what `AutoModelForCausalLM.from_pretrained` of a saved adapted model gives back."""
    return with_embeddings(load_teacher_model(model_cfg, teacher_tokenizer), embeddings, student_tokenizer)


def init_key(init_cfg, model_identity: dict[str, Any], student_tokenizer, texts_digest: str) -> str:
    return cache_key({"init": dict(init_cfg.items()), "model": model_identity, "student": tokenizer_fingerprint(student_tokenizer),
                      "texts": texts_digest})


def initialize_student(init_cfg, teacher_model, teacher_tokenizer, student_tokenizer, texts: list[str], *,
                       cache_dir: str | Path, output_dir: str | Path, key: str, overlap=None):
    """`(student_model, info)`: a copy of the teacher with initial embeddings for the student vocabulary.

    Reuses `<output_dir>/init` when it was written for the same `key` (resume, non-main ranks).
    `overlap`: the teacher/student `TokenOverlap` when the caller has it (else computed here)."""
    directory = Path(output_dir) / INIT_DIR
    key_file = directory / KEY_FILE
    stored = json.loads(key_file.read_text()) if key_file.is_file() else {}
    if stored.get("key") == key:
        logger.info("Initial embeddings from %s", directory)
        return with_embeddings(copy.deepcopy(teacher_model), TransferResult.load(directory),
                               student_tokenizer), stored["info"]

    method = str(init_cfg.method)
    if method == "checkpoint":  # checked against the model and the student vocabulary by preflight
        student = with_embeddings(copy.deepcopy(teacher_model), TransferResult.load(init_cfg.checkpoint),
                                  student_tokenizer)
        info: dict[str, Any] = {"method": "checkpoint", "checkpoint": str(init_cfg.checkpoint)}
    else:
        student, report = build_student_model(
            teacher_model, teacher_tokenizer, student_tokenizer, method,
            texts=texts if method == "focus" else None, overlap=overlap,
            fasttext_min_count=init_cfg.fasttext_min_count, fasttext_epochs=init_cfg.fasttext_epochs,
            fasttext_dim=init_cfg.fasttext_dim, fasttext_threads=init_cfg.fasttext_threads,
            cache_dir=Path(cache_dir) / "fasttext", seed=init_cfg.seed,
            focus_fallback=str(init_cfg.focus_fallback),
        )
        info = report.to_dict()
        info.pop("overlap_summary", None)

    directory.mkdir(parents=True, exist_ok=True)
    embeddings_of(student).save(directory)
    key_file.write_text(json.dumps({"key": key, "info": info}, indent=2, default=str))
    return student, info


def init_metrics(info: dict[str, Any]) -> dict[str, float]:
    """Numbers of the init report worth tracking (`initialization/num_new`, `initialization/count_focus`, ...);
    not `init/...`, which holds the evaluation of the initialised model."""
    metrics = numeric_metrics(info, "initialization/")
    for kind, count in (info.get("counts") or {}).items():
        metrics[f"initialization/count_{kind}"] = float(count)
    return metrics


def release_memory() -> None:
    """Collect garbage and return cached accelerator memory (call after dropping a model)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
