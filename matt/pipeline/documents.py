"""Documents for a run, from the `data` group: train / validation / test splits of plain text.

Sources (`data.path`):
- a hub dataset id (`data.config_name`, `data.train_split`, ...; `data.streaming` keeps only the
  first `data.max_documents` documents, so a huge corpus is never downloaded in full);
- a local file (`.jsonl`/`.json`/`.parquet`/`.csv`/`.txt`) - one split, validation held out by
  `data.validation_fraction`;
- a local directory with `{split}.{jsonl,json,parquet,csv,txt}` files (the offline corpora);
- `builtin:sample` - short multilingual documents made of `matt.tiny.SAMPLE_TEXTS` (smoke runs).

Every split comes back as a `datasets.Dataset` with one column, `text`. Loading goes through
`datasets.load_dataset` (cached by `datasets`); caps are applied after loading, in order:
`max_documents`, then `max_tokens` (teacher tokens, whole documents).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any


logger = logging.getLogger(__name__)

SUFFIX_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
FILE_FORMATS = ("json", "parquet", "csv", "text")


@dataclass
class Documents:
    """The splits of one data config (validation/test may be absent)."""

    train: Any
    validation: Any | None
    test: Any | None
    source: str

    def split(self, name: str):
        """The split called `name` (train | validation | test)."""
        dataset = getattr(self, name)
        if dataset is None:
            raise ValueError(f"The data {self.source} has no {name} split: set data.{name}_split (or "
                             "data.validation_fraction > 0 for a held-out validation split), or choose another "
                             "eval.split")
        return dataset

    def summary(self) -> dict[str, int]:
        splits = {"train": self.train, "validation": self.validation, "test": self.test}
        return {name: len(split) for name, split in splits.items() if split is not None}


def builtin_documents(name: str) -> list[str]:
    """`sample`: 40 documents of four sentences drawn (seeded) from `matt.tiny.SAMPLE_TEXTS`."""
    if name != "sample":
        raise ValueError(f"data.path=builtin:{name} is unknown: choose one of ['builtin:sample']")
    from matt.tiny import SAMPLE_TEXTS

    rng = random.Random(0)
    return [" ".join(rng.sample(SAMPLE_TEXTS, 4)) for _ in range(40)]


TEXT_DTYPES = ("string", "large_string", "null")
"""Arrow types a text column may have (null: every entry missing, counted as skipped later)."""


def _check_column(dataset, data_cfg, where: str):
    column = data_cfg.text_column
    if column not in dataset.column_names:
        raise ValueError(f"data.text_column={column!r} is not a column of {where}; its columns are "
                         f"{dataset.column_names}")
    feature = dataset.features[column]
    dtype = getattr(feature, "dtype", None)
    if dtype not in TEXT_DTYPES:
        example = next((v for v in dataset.select(range(min(len(dataset), 100)))[column] if v is not None), None)
        raise ValueError(f"data.text_column={column!r} of {where} holds {dtype or type(feature).__name__} values, "
                         f"not text (e.g. {example!r}); point data.text_column at a column of strings")
    dataset = dataset.select_columns([column])
    return dataset.rename_column(column, "text") if column != "text" else dataset


def check_utf8(path: Path) -> None:
    """Raise `ValueError` naming the file, line and byte offset of the first invalid UTF-8 sequence."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, lines = 0, 0
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as exc:
                position = max(exc.start, 0)
                line = lines + block[:position].count(b"\n") + 1
                raise ValueError(f"data.path: {path} is not valid UTF-8: byte {offset + position} (line {line}) "
                                 f"is {block[position:position + 4]!r}; re-encode the file as UTF-8") from None
            offset += len(block)
            lines += block.count(b"\n")
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise ValueError(f"data.path: {path} is not valid UTF-8: it ends inside a multi-byte character "
                             f"(byte {offset}); re-encode the file as UTF-8") from None


def _load_file(path: Path, split: str, data_cfg):
    import datasets

    fmt = str(data_cfg.format)
    builder = fmt if fmt in FILE_FORMATS else SUFFIX_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise ValueError(f"data.path={str(path)!r}: cannot tell the file format from {path.suffix!r}; set data.format "
                         f"to one of {sorted(FILE_FORMATS)}")
    if path.stat().st_size == 0:
        raise ValueError(f"data.path: {path} is empty (0 bytes)")
    if builder != "parquet":
        check_utf8(path)
    kwargs = {"sample_by": str(data_cfg.text_sample_by)} if builder == "text" else {}
    try:
        dataset = datasets.load_dataset(builder, data_files={split: str(path)}, split=split, **kwargs)
    except Exception as exc:  # a library's parse error, deep and late: name the file and the reader
        cause = exc.__cause__ or exc
        raise ValueError(f"data.path: could not read {path} as {builder} ({type(cause).__name__}: {cause}); "
                         "check the file, or set data.format") from exc
    return _check_column(dataset, data_cfg, f"{path}")


def _split_names(data_cfg) -> dict[str, str]:
    """The configured split name of each role (train | validation | test) that is set."""
    names = {"train": data_cfg.train_split, "validation": data_cfg.validation_split, "test": data_cfg.test_split}
    return {role: name for role, name in names.items() if name is not None}


def _load_local_dir(directory: Path, data_cfg) -> dict[str, Any]:
    splits: dict[str, Any] = {}
    for role, name in _split_names(data_cfg).items():
        candidates = [directory / f"{name}{suffix}" for suffix in SUFFIX_BUILDERS]
        path = next((candidate for candidate in candidates if candidate.is_file()), None)
        if path is None:
            if role == "train" or role == "validation" and not data_cfg.validation_fraction:
                present = sorted(p.name for p in directory.iterdir())
                raise ValueError(f"data.{role}_split={name!r}: no {name}.{{jsonl,json,parquet,csv,txt}} in "
                                 f"{directory} (it holds {present})")
            logger.info("No %s split file in %s", name, directory)
            continue
        splits[role] = _load_file(path, name, data_cfg)
    return splits


def _load_hub(data_cfg) -> dict[str, Any]:
    import datasets

    if data_cfg.streaming and data_cfg.max_documents is None:
        raise ValueError("data.streaming=true needs data.max_documents (how many documents to keep)")
    splits: dict[str, Any] = {}
    for role, name in _split_names(data_cfg).items():
        if data_cfg.streaming:
            stream = datasets.load_dataset(data_cfg.path, name=data_cfg.config_name, split=name, streaming=True)
            limit = data_cfg.max_documents if role == "train" else (data_cfg.max_validation_documents
                                                                   or data_cfg.max_documents)
            dataset = datasets.Dataset.from_list(list(stream.take(limit)))
        else:
            dataset = datasets.load_dataset(data_cfg.path, name=data_cfg.config_name, split=name)
        splits[role] = _check_column(dataset, data_cfg, f"{data_cfg.path} ({name})")
    return splits


def _cap_tokens(dataset, max_tokens: int, tokenizer):
    """The first documents whose teacher-token count reaches `max_tokens` (whole documents)."""
    total = 0
    for start in range(0, len(dataset), 256):
        texts = list(dataset[start:start + 256]["text"])
        for offset, ids in enumerate(tokenizer([t or "" for t in texts], add_special_tokens=False)["input_ids"]):
            total += len(ids)
            if total >= max_tokens:
                return dataset.select(range(start + offset + 1)), total
    return dataset, total


def load_documents(data_cfg, teacher_tokenizer=None) -> Documents:
    """Load, split and cap the documents of `data_cfg` (see the module docstring)."""
    import datasets

    path = str(data_cfg.path)
    fmt = str(data_cfg.format)
    if path.startswith("builtin:") or fmt == "builtin":
        texts = builtin_documents(path.split(":", 1)[1] if ":" in path else path)
        splits = {"train": datasets.Dataset.from_dict({"text": texts})}
        source = path
    elif fmt == "hub" or (fmt == "auto" and not Path(path).expanduser().exists()):
        splits = _load_hub(data_cfg)
        source = f"hub:{path}" + (f"/{data_cfg.config_name}" if data_cfg.config_name else "")
    else:
        local = Path(path).expanduser()
        if local.is_dir():
            splits = _load_local_dir(local, data_cfg)
        elif local.is_file():
            splits = {"train": _load_file(local, data_cfg.train_split, data_cfg)}
        else:
            raise ValueError(f"data.path={path!r} does not exist")
        source = str(local)

    train = splits["train"]
    validation = splits.get("validation")
    if validation is None and data_cfg.validation_fraction:
        if not 0 < data_cfg.validation_fraction < 1:
            raise ValueError(f"data.validation_fraction={data_cfg.validation_fraction} must be in (0, 1)")
        parts = train.train_test_split(test_size=data_cfg.validation_fraction, seed=data_cfg.seed, shuffle=True)
        train, validation = parts["train"], parts["test"]
        logger.info("Held out %d of %d documents as validation (data.validation_fraction=%s)", len(validation),
                    len(train) + len(validation), data_cfg.validation_fraction)

    if data_cfg.max_documents is not None and len(train) > data_cfg.max_documents:
        train = train.select(range(data_cfg.max_documents))
    if data_cfg.max_tokens is not None:
        if teacher_tokenizer is None:
            raise ValueError("data.max_tokens needs the teacher tokenizer to count tokens")
        train, total = _cap_tokens(train, data_cfg.max_tokens, teacher_tokenizer)
        logger.info("data.max_tokens=%d: kept %d documents (%d teacher tokens)", data_cfg.max_tokens, len(train), total)
    if validation is not None and data_cfg.max_validation_documents is not None:
        validation = validation.select(range(min(len(validation), data_cfg.max_validation_documents)))
    if len(train) == 0:
        raise ValueError(f"The train split of {source} is empty")
    documents = Documents(train=train, validation=validation, test=splits.get("test"), source=source)
    logger.info("Documents from %s: %s", source, documents.summary())
    return documents
