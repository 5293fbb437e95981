"""Training data for AIM: documents -> aligned, segmented examples (cached on disk) -> padded batches.

`prepare_dataset` runs `matt.segmentation.segment_document` over every document with
`datasets.Dataset.map` (parallel with `num_proc`) and saves the result under a directory named by
a fingerprint of everything that determines it: the input data, both tokenizers (their full Rust
pipelines, special-token handling included), `max_length` and the text column. A second call with
the same inputs loads that directory instead of re-tokenizing; any change gives a new directory.

Skipped documents are never dropped silently: their counts (`SegmentationStats`) are logged,
stored next to the cache and returned with the dataset.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence

from matt.digests import json_digest, texts_digest, tokenizer_fingerprint
from matt.segmentation import IGNORE_INDEX, SegmentationStats, check_offsets_support, segment_document

logger = logging.getLogger(__name__)

COLUMNS = ("teacher_input_ids", "teacher_segment_ids", "student_input_ids", "student_segment_ids")
FORMAT_VERSION = 3
"""Bump when the prepared format or the segmentation rules change (invalidates every cache).
2: special tokens matched inside the text get segment id -100.
3: special tokens matched from the text (chat markers, [UNK]) are content again; only inserted
   (zero-width) tokens get -100."""
STATS_FILE = "segmentation_stats.json"
_DONE_MARKER = ".complete"


def default_cache_dir() -> Path:
    """`$MATT_CACHE/datasets`, default `~/.cache/matt/datasets`."""
    root = os.environ.get("MATT_CACHE") or Path.home() / ".cache" / "matt"
    return Path(root) / "datasets"


# ----------------------------------------------------------------------------------------------
# fingerprints
# ----------------------------------------------------------------------------------------------
def _data_fingerprint(dataset, text_column: str) -> str:
    fingerprint = getattr(dataset, "_fingerprint", None)
    if fingerprint:
        return f"datasets:{fingerprint}"
    return f"rows:{texts_digest(repr(row) for row in dataset[text_column])}"


# ----------------------------------------------------------------------------------------------
# input validation
# ----------------------------------------------------------------------------------------------
def as_dataset(data, text_column: str = "text"):
    """A `datasets.Dataset` with a `text_column` from a Dataset, a list of strings or a list of dicts.

    Raises `ValueError` naming the column (and the available ones) when it is missing."""
    import datasets

    if isinstance(data, datasets.DatasetDict):
        raise ValueError(f"Got a DatasetDict with splits {list(data)}; pass one split, e.g. data['train']")
    if isinstance(data, datasets.IterableDataset):
        raise ValueError("Streaming (Iterable) datasets cannot be cached for reuse; take a slice first, e.g. "
                         "datasets.Dataset.from_list(list(stream.take(n)))")
    if isinstance(data, str):
        raise TypeError("dataset must be a collection of documents, not a single string")
    if not isinstance(data, datasets.Dataset):
        rows = list(data)
        as_dicts = bool(rows) and all(isinstance(row, dict) for row in rows)
        # Arrow would fail on mixed types with an obscure "Expected bytes, got a 'int' object"
        texts = [row.get(text_column) for row in rows] if as_dicts else rows
        bad = next(((i, t) for i, t in enumerate(texts) if t is not None and not isinstance(t, str)), None)
        if bad is not None:
            raise ValueError(f"document {bad[0]} is a {type(bad[1]).__name__}, not text: every entry of the text "
                             f"column {text_column!r} must be a string (None entries are skipped and counted)")
        data = datasets.Dataset.from_list(rows) if as_dicts else datasets.Dataset.from_dict({text_column: rows})
    if text_column not in data.column_names:
        raise ValueError(f"text column {text_column!r} is not in the dataset; its columns are {data.column_names} "
                         "(set text_column / data.text_column)")
    if len(data) == 0:
        raise ValueError("The dataset is empty: no documents to prepare")
    return data


# ----------------------------------------------------------------------------------------------
# preparation
# ----------------------------------------------------------------------------------------------
def _segment_batch(batch: dict[str, list], *, text_column: str, teacher_tokenizer, student_tokenizer,
                   max_length: int) -> dict[str, list]:
    """One row per document: its examples (lists of lists) and its skip counts."""
    out: dict[str, list] = {name: [] for name in (*COLUMNS, *SegmentationStats.counter_names())}
    for text in batch[text_column]:
        stats = SegmentationStats()
        examples = segment_document(text, teacher_tokenizer, student_tokenizer, max_length, stats)
        for name in COLUMNS:
            out[name].append([getattr(example, name) for example in examples])
        for name in SegmentationStats.counter_names():
            out[name].append(getattr(stats, name))
    return out


def _flatten(batch: dict[str, list]) -> dict[str, list]:
    return {name: [example for document in batch[name] for example in document] for name in COLUMNS}


@dataclass
class PreparedDataset:
    """What `prepare_dataset` returns: the examples and what happened to the documents."""

    dataset: Any
    """`datasets.Dataset` with the four `COLUMNS` (lists of ints)."""
    stats: SegmentationStats
    path: Path
    """The cache directory holding the dataset."""


def prepare_dataset(
    data,
    teacher_tokenizer,
    student_tokenizer,
    *,
    max_length: int = 512,
    num_proc: int = 1,
    cache_dir: str | os.PathLike | None = None,
    text_column: str = "text",
    overwrite: bool = False,
) -> PreparedDataset:
    """Segment every document for both tokenizers; load from `cache_dir` when prepared before.

    Raises `ValueError` when no document yields an example (all empty / whitespace / not text)."""
    import datasets

    if not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
    if not isinstance(num_proc, int) or num_proc < 1:
        raise ValueError(f"num_proc must be a positive integer, got {num_proc!r}")
    check_offsets_support(teacher_tokenizer, "teacher_tokenizer")
    check_offsets_support(student_tokenizer, "student_tokenizer")
    data = as_dataset(data, text_column)

    fingerprint = json_digest({
        "version": FORMAT_VERSION,
        "data": _data_fingerprint(data, text_column),
        "teacher": tokenizer_fingerprint(teacher_tokenizer),
        "student": tokenizer_fingerprint(student_tokenizer),
        "max_length": max_length,
        "text_column": text_column,
    })[:24]
    path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = path / f"aim-{fingerprint}"

    if (path / _DONE_MARKER).exists() and not overwrite:
        stats = SegmentationStats(**json.loads((path / STATS_FILE).read_text()))
        logger.info("Loaded the prepared dataset from %s (%s)", path, stats.summary())
        return PreparedDataset(datasets.load_from_disk(str(path)), stats, path)

    num_proc = min(num_proc, len(data))
    if num_proc > 1:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked workers must not share Rust threads
    fn_kwargs = dict(text_column=text_column, teacher_tokenizer=teacher_tokenizer,
                     student_tokenizer=student_tokenizer, max_length=max_length)
    per_document = data.map(
        _segment_batch, batched=True, batch_size=64, fn_kwargs=fn_kwargs, num_proc=num_proc if num_proc > 1 else None,
        remove_columns=data.column_names, desc="Segmenting documents", load_from_cache_file=False,
        new_fingerprint=f"{fingerprint}-documents",
    )
    stats = SegmentationStats(**{name: int(sum(per_document[name])) for name in SegmentationStats.counter_names()})
    logger.info("Segmentation: %s", stats.summary())
    if stats.examples == 0:
        raise ValueError(f"No training example could be made from the dataset: {stats.summary()}")
    examples = per_document.map(
        _flatten, batched=True, batch_size=256, remove_columns=per_document.column_names,
        desc="Collecting examples", load_from_cache_file=False, new_fingerprint=fingerprint,
    )

    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    examples.save_to_disk(str(tmp))
    (tmp / STATS_FILE).write_text(json.dumps(stats.as_dict(), indent=2))
    (tmp / _DONE_MARKER).touch()
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    logger.info("Prepared %d examples from %d documents into %s", len(examples), stats.documents, path)
    return PreparedDataset(datasets.load_from_disk(str(path)), stats, path)


# ----------------------------------------------------------------------------------------------
# batching
# ----------------------------------------------------------------------------------------------
def pad_id(tokenizer) -> int:
    """Pad id for batching; padded positions are masked, so any valid id works as a fallback."""
    candidates = (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id)
    return next((token_id for token_id in candidates if token_id is not None), 0)


class AIMCollator:
    """Pad both sides of a list of prepared examples to the longest in the batch (right padding).

    Returns long tensors `{teacher,student}_{input_ids,attention_mask,segment_ids}`; padding has
    the tokenizer's pad id (or any valid id: it is masked), attention 0 and segment -100.
    """

    def __init__(self, teacher_pad_id: int, student_pad_id: int) -> None:
        self.pad_ids = {"teacher": int(teacher_pad_id), "student": int(student_pad_id)}

    def __call__(self, examples: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("AIMCollator got an empty batch")
        batch = {}
        for side, pad in self.pad_ids.items():
            ids = [torch.tensor(example[f"{side}_input_ids"], dtype=torch.long) for example in examples]
            segments = [torch.tensor(example[f"{side}_segment_ids"], dtype=torch.long) for example in examples]
            for row, (row_ids, row_segments) in enumerate(zip(ids, segments)):
                if len(row_ids) != len(row_segments):
                    raise ValueError(f"{side} example {row}: {len(row_ids)} input ids but {len(row_segments)} "
                                     "segment ids (a corrupted prepared dataset?)")
            batch[f"{side}_input_ids"] = pad_sequence(ids, batch_first=True, padding_value=pad)
            batch[f"{side}_attention_mask"] = pad_sequence([torch.ones_like(row) for row in ids], batch_first=True)
            batch[f"{side}_segment_ids"] = pad_sequence(segments, batch_first=True, padding_value=IGNORE_INDEX)
        return batch
