"""The student tokenizer from the `tokenizer` group: pretrained | train | extend.

Trained and extended tokenizers are cached under `<cache_dir>/tokenizers/<key>`, the key hashing
the teacher tokenizer, the options and the training texts, so sweeps over other settings reuse
one tokenizer. A tokenizer is always returned as loaded back from disk, so a fresh and a cached
run see the identical object (and share prepared-dataset caches).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from matt.digests import cache_key, texts_digest, tokenizer_fingerprint

logger = logging.getLogger(__name__)


def tokenizer_key(tok_cfg, teacher_tokenizer, texts: list[str]) -> str:
    """Hash of everything a trained/extended student tokenizer depends on."""
    source = tok_cfg.source
    options = {"source": source, "kind": tok_cfg.kind,
               "vocab_size": tok_cfg.vocab_size if source == "train" else None,
               "num_new_tokens": tok_cfg.num_new_tokens if source == "extend" else None,
               "min_frequency": tok_cfg.min_frequency if source == "extend" else None,
               "path": tok_cfg.path if source == "pretrained" else None}
    return cache_key({"teacher": tokenizer_fingerprint(teacher_tokenizer), "options": options,
                      "texts": texts_digest(texts) if options["path"] is None else None})


def _build(tok_cfg, teacher_tokenizer, texts: list[str]):
    from matt.tokenizers import extend_tokenizer, train_tokenizer_like

    source = tok_cfg.source
    if source == "train":
        logger.info("Training a %s student tokenizer (vocab %d) on %d documents", tok_cfg.kind,
                    tok_cfg.vocab_size, len(texts))
        return train_tokenizer_like(teacher_tokenizer, texts, tok_cfg.vocab_size, kind=str(tok_cfg.kind))
    logger.info("Extending the teacher vocabulary by up to %d tokens learned on %d documents",
                tok_cfg.num_new_tokens, len(texts))
    return extend_tokenizer(teacher_tokenizer, texts, tok_cfg.num_new_tokens,
                            min_frequency=tok_cfg.min_frequency)


def load_pretrained_student(tok_cfg):
    """`tokenizer=pretrained`: the tokenizer at `tokenizer.path`, a fast one (segmentation needs offsets)."""
    from transformers import AutoTokenizer

    from matt.segmentation import check_offsets_support

    if not tok_cfg.path:
        raise ValueError("tokenizer=pretrained needs tokenizer.path=<tokenizer directory or hub id>")
    tokenizer = AutoTokenizer.from_pretrained(tok_cfg.path)
    check_offsets_support(tokenizer, f"tokenizer.path={tok_cfg.path!r}")
    return tokenizer


def build_student_tokenizer(tok_cfg, teacher_tokenizer, documents, *, cache_dir: str | Path):
    """The student tokenizer (loaded from the cache when this exact one was built before)."""
    from transformers import AutoTokenizer

    from matt.segmentation import check_offsets_support

    if tok_cfg.source == "pretrained":
        return load_pretrained_student(tok_cfg)

    texts = [t for t in documents.train["text"] if t][:tok_cfg.max_documents]  # None: all
    if not texts:
        raise ValueError("No non-empty training documents to learn the student tokenizer from")
    directory = Path(cache_dir) / "tokenizers" / tokenizer_key(tok_cfg, teacher_tokenizer, texts)
    if not (directory / "tokenizer.json").is_file():
        tokenizer = _build(tok_cfg, teacher_tokenizer, texts)
        tmp = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tokenizer.save_pretrained(str(tmp))
        directory.parent.mkdir(parents=True, exist_ok=True)
        if directory.exists():  # another process finished first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    else:
        logger.info("Student tokenizer from cache %s", directory)
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    check_offsets_support(tokenizer, "student tokenizer")
    return tokenizer
