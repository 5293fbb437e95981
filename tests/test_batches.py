"""Data preparation (segmented examples, cached on disk) and the AIM collator."""

from __future__ import annotations

import json
import random

import datasets
import pytest
import torch

import matt.batches as batches_module
from matt.batches import COLUMNS, STATS_FILE, AIMCollator, prepare_dataset
from matt.segmentation import IGNORE_INDEX, SegmentationStats, segment_document


@pytest.fixture(scope="module")
def tokenizers(tokenizer_zoo):
    return tokenizer_zoo["llama3"], tokenizer_zoo["mistral_eos"]


@pytest.fixture(scope="module")
def documents(text_tools):
    rng = random.Random(8)
    docs = [" ".join(text_tools.random_text(rng) for _ in range(rng.randint(1, 6))) for _ in range(24)]
    return docs[:10] + ["", "   \n\t", None] + docs[10:]


def direct(docs, teacher, student, max_length):
    stats = SegmentationStats()
    examples = [e for doc in docs for e in segment_document(doc, teacher, student, max_length, stats)]
    return examples, stats


def rows(dataset) -> list[tuple]:
    return [tuple(tuple(row[c]) for c in COLUMNS) for row in dataset]


def test_prepared_examples_equal_segment_document(tokenizers, documents, tmp_path):
    teacher, student = tokenizers
    prepared = prepare_dataset(documents, teacher, student, max_length=24, cache_dir=tmp_path)
    examples, stats = direct(documents, teacher, student, 24)
    assert prepared.dataset.column_names == list(COLUMNS)
    assert rows(prepared.dataset) == [tuple(tuple(getattr(e, c)) for c in COLUMNS) for e in examples]
    assert len(examples) > len(documents)  # long documents were continued, not cut off
    assert prepared.stats == stats
    assert (stats.documents, stats.skipped_empty, stats.skipped_not_text) == (len(documents), 2, 1)
    assert stats.examples == len(prepared.dataset)
    saved = json.loads((prepared.path / STATS_FILE).read_text())
    assert saved == stats.as_dict()
    assert prepared.path.parent == tmp_path


def test_the_disk_cache_is_reused(tokenizers, documents, tmp_path, monkeypatch):
    teacher, student = tokenizers
    first = prepare_dataset(documents, teacher, student, max_length=32, cache_dir=tmp_path)

    def forbidden(*args, **kwargs):
        raise AssertionError("segment_document was called: the cache was not reused")

    monkeypatch.setattr(batches_module, "segment_document", forbidden)
    second = prepare_dataset(list(documents), teacher, student, max_length=32, cache_dir=tmp_path)
    assert second.path == first.path
    assert rows(second.dataset) == rows(first.dataset) and second.stats == first.stats
    monkeypatch.undo()
    # an in-memory datasets.Dataset built again from the same rows hits its cache as well
    as_dataset = lambda: datasets.Dataset.from_dict({"text": documents})  # noqa: E731
    cached = prepare_dataset(as_dataset(), teacher, student, max_length=32, cache_dir=tmp_path)
    monkeypatch.setattr(batches_module, "segment_document", forbidden)
    again = prepare_dataset(as_dataset(), teacher, student, max_length=32, cache_dir=tmp_path)
    assert again.path == cached.path and rows(again.dataset) == rows(first.dataset)
    monkeypatch.undo()
    third = prepare_dataset(documents, teacher, student, max_length=32, cache_dir=tmp_path, overwrite=True)
    assert third.path == first.path and rows(third.dataset) == rows(first.dataset)


def test_changes_give_a_new_cache(tokenizer_zoo, tokenizers, documents, tmp_path, monkeypatch):
    teacher, student = tokenizers
    base = prepare_dataset(documents, teacher, student, max_length=32, cache_dir=tmp_path)
    calls = []
    real = batches_module.segment_document

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(batches_module, "segment_document", counting)
    other_tokenizer = tokenizer_zoo["llama3@small"]
    variants = {
        "max_length": dict(data=documents, teacher=teacher, student=student, max_length=33),
        "teacher": dict(data=documents, teacher=other_tokenizer, student=student, max_length=32),
        "student": dict(data=documents, teacher=teacher, student=other_tokenizer, max_length=32),
        "data": dict(data=documents[:-1], teacher=teacher, student=student, max_length=32),
        "one character": dict(data=documents[:-1] + [documents[-1] + "!"], teacher=teacher, student=student,
                              max_length=32),
    }
    paths = {base.path}
    for name, v in variants.items():
        calls.clear()
        prepared = prepare_dataset(v["data"], v["teacher"], v["student"], max_length=v["max_length"],
                                   cache_dir=tmp_path)
        assert calls, f"{name}: changed inputs must be segmented again"
        assert prepared.path not in paths, name
        paths.add(prepared.path)
    # a tokenizer differing only in its post-processor (BOS or not) is a different tokenizer too
    with_bos, without_bos = tokenizer_zoo["bytelevel_trim_bos"], tokenizer_zoo["gpt2"]
    a = prepare_dataset(documents, with_bos, student, max_length=32, cache_dir=tmp_path)
    b = prepare_dataset(documents, without_bos, student, max_length=32, cache_dir=tmp_path)
    assert a.path != b.path


def test_num_proc_2_gives_the_same_examples(tokenizers, documents, tmp_path):
    teacher, student = tokenizers
    one = prepare_dataset(documents, teacher, student, max_length=20, cache_dir=tmp_path / "one")
    two = prepare_dataset(documents, teacher, student, max_length=20, num_proc=2, cache_dir=tmp_path / "two")
    assert rows(one.dataset) == rows(two.dataset)
    assert one.stats == two.stats


def test_accepted_inputs(tokenizers, tmp_path):
    teacher, student = tokenizers
    texts = ["Привіт, світе!", "hello world", "Zażółć gęślą jaźń"]
    as_strings = prepare_dataset(texts, teacher, student, max_length=64, cache_dir=tmp_path)
    as_dicts = prepare_dataset([{"text": t, "id": i} for i, t in enumerate(texts)], teacher, student,
                               max_length=64, cache_dir=tmp_path)
    as_dataset = prepare_dataset(datasets.Dataset.from_dict({"body": texts}), teacher, student, max_length=64,
                                 cache_dir=tmp_path, text_column="body")
    expected = rows(as_strings.dataset)
    assert len(expected) == 3
    assert rows(as_dicts.dataset) == expected and rows(as_dataset.dataset) == expected


def test_bad_inputs_fail_clearly(tokenizers, tmp_path):
    from transformers import ByT5Tokenizer

    teacher, student = tokenizers
    with pytest.raises(ValueError, match=r"text column 'text'.*\['body', 'id'\]"):
        prepare_dataset([{"body": "hello", "id": 1}], teacher, student, cache_dir=tmp_path)
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["hello"]})})
    with pytest.raises(ValueError, match=r"DatasetDict.*\['train'\]"):
        prepare_dataset(splits, teacher, student, cache_dir=tmp_path)
    stream = datasets.Dataset.from_dict({"text": ["hello"]}).to_iterable_dataset()
    with pytest.raises(ValueError, match="Iterable"):
        prepare_dataset(stream, teacher, student, cache_dir=tmp_path)
    for rows in (["hello", 5], [{"text": "hello"}, {"text": ["a", "b"]}]):
        with pytest.raises(ValueError, match=r"document 1 is a (int|list), not text.*'text'"):
            prepare_dataset(rows, teacher, student, cache_dir=tmp_path)
    with pytest.raises(TypeError, match="single string"):
        prepare_dataset("hello world", teacher, student, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="empty"):
        prepare_dataset([], teacher, student, cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"No training example.*3 documents"):
        prepare_dataset(["", "  \n ", None], teacher, student, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="not a fast tokenizer"):
        prepare_dataset(["hello"], ByT5Tokenizer(), student, cache_dir=tmp_path)
    for bad in dict(max_length=0), dict(num_proc=0):
        with pytest.raises(ValueError, match=next(iter(bad))):
            prepare_dataset(["hello"], teacher, student, cache_dir=tmp_path, **bad)
    assert not any(tmp_path.iterdir())  # nothing half-written was left behind


def test_collator_pads_right(tokenizers, documents, tmp_path):
    teacher, student = tokenizers
    prepared = prepare_dataset(documents, teacher, student, max_length=24, cache_dir=tmp_path)
    examples = [prepared.dataset[i] for i in range(5)]
    collate = AIMCollator(teacher.pad_token_id, student.pad_token_id)
    batch = collate(examples)
    assert set(batch) == {f"{side}_{name}" for side in ("teacher", "student")
                          for name in ("input_ids", "attention_mask", "segment_ids")}
    for side, pad_id in (("teacher", teacher.pad_token_id), ("student", student.pad_token_id)):
        ids, mask, segs = (batch[f"{side}_{n}"] for n in ("input_ids", "attention_mask", "segment_ids"))
        lengths = [len(e[f"{side}_input_ids"]) for e in examples]
        assert ids.shape == mask.shape == segs.shape == (5, max(lengths))
        assert ids.dtype == mask.dtype == segs.dtype == torch.long
        for row, (example, length) in enumerate(zip(examples, lengths)):
            assert ids[row, :length].tolist() == example[f"{side}_input_ids"]
            assert segs[row, :length].tolist() == example[f"{side}_segment_ids"]
            assert mask[row].tolist() == [1] * length + [0] * (ids.shape[1] - length)
            assert set(ids[row, length:].tolist()) <= {pad_id}
            assert set(segs[row, length:].tolist()) <= {IGNORE_INDEX}
        assert min(lengths) < max(lengths)  # padding actually happened
    with pytest.raises(ValueError, match="empty batch"):
        collate([])
    broken = dict(examples[0], teacher_segment_ids=examples[0]["teacher_segment_ids"][:-1])
    with pytest.raises(ValueError, match="segment ids"):
        collate([broken])
