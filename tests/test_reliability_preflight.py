"""Bad data, bad paths and unusable tracking stores fail in preflight, within seconds, with an error
naming the key or the file (issue 12), instead of late and deep inside a library."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest

from matt.hydra_app import compose
from matt.pipeline.preflight import preflight
from matt.tiny import SAMPLE_TEXTS, tiny_model, train_tokenizer

SMOKE = ["experiment=smoke"]


@pytest.fixture
def paths(tmp_path):
    return [f"paths.output_root={tmp_path / 'out'}", f"paths.cache_dir={tmp_path / 'cache'}"]


def fails_fast(overrides, message, limit_s=10.0):
    cfg = compose("transfer", overrides)
    started = time.perf_counter()
    with pytest.raises(ValueError, match=message):
        preflight(cfg)
    assert time.perf_counter() - started < limit_s


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------
def local(paths, path):
    return SMOKE + paths + ["data=local", f"data.path={path}"]


@pytest.mark.parametrize("suffix", [".jsonl", ".txt"])
def test_empty_data_file(paths, tmp_path, suffix):
    empty = tmp_path / f"empty{suffix}"
    empty.write_bytes(b"")
    fails_fast(local(paths, empty), rf"data\.path: .*empty{suffix} is empty")


@pytest.mark.parametrize("suffix", [".jsonl", ".txt", ".csv"])
def test_invalid_utf8(paths, tmp_path, suffix):
    bad = tmp_path / f"latin1{suffix}"
    lines = {".jsonl": [json.dumps({"text": t}, ensure_ascii=False) for t in SAMPLE_TEXTS[:3]],
             ".txt": list(SAMPLE_TEXTS[:3]), ".csv": ["text", *[f'"{t}"' for t in SAMPLE_TEXTS[:3]]]}[suffix]
    bad.write_bytes("\n".join(lines).encode("utf-8") + "\nCaf\u00e9 cr\u00e8me\n".encode("latin-1"))
    line = len(lines) + 1
    fails_fast(local(paths, bad), rf"{bad.name} is not valid UTF-8: byte \d+ \(line {line}\)")


def test_text_column_of_numbers(paths, tmp_path):
    data = tmp_path / "numbers.jsonl"
    data.write_text("\n".join(json.dumps({"text": n}) for n in (123, 456)))
    fails_fast(local(paths, data), r"data\.text_column='text' of .*numbers\.jsonl holds int64 values, not text "
                                   r"\(e\.g\. 123\)")


def test_non_text_documents_from_an_in_memory_dataset_are_named():
    from matt.digests import texts_digest

    assert texts_digest(["a", "b"]) != texts_digest(["ab"])
    with pytest.raises(ValueError, match=r"Training document 1 is int \(123\), not text: .*data\.text_column"):
        texts_digest(["fine", 123])


def test_unparsable_file_names_the_file(paths, tmp_path):
    data = tmp_path / "broken.jsonl"
    data.write_text('{"text": "ok"}\n{"text": \n')
    fails_fast(local(paths, data), r"data\.path: could not read .*broken\.jsonl as json")


def test_evaluation_counts_empty_and_null_documents(caplog):
    import datasets

    from matt.pipeline.documents import Documents
    from matt.pipeline.evaluate import EvalSuite

    validation = datasets.Dataset.from_dict({"text": [SAMPLE_TEXTS[0], None, "", SAMPLE_TEXTS[1], None]})
    documents = Documents(train=datasets.Dataset.from_dict({"text": SAMPLE_TEXTS}), validation=validation,
                          test=None, source="unit")
    cfg = compose("transfer", ["experiment=smoke", "eval=quick", "eval.max_document_bytes=100"]).eval
    suite = EvalSuite.build(cfg, documents)
    assert suite.empty_documents == 3 and len(suite.texts) == 2
    assert suite.describe()["eval/empty_documents"] == 3.0
    assert "3 of 5 documents are empty or null" in caplog.text


# ------------------------------------------------------------------------------------------------
# paths that only a local file can mean are never sent to the Hub
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key,extra", [
    ("data.path", ["data=local"]),
    ("tokenizer.path", ["tokenizer=pretrained"]),
    ("model.pretrained", ["model=smollm2_135m", "objective.n_layers=2"]),
])
@pytest.mark.parametrize("value", ["{tmp}/missing/dir", "./no_such_corpus.jsonl", "~/no/such/model"])
def test_missing_local_path_names_the_key(paths, tmp_path, monkeypatch, key, extra, value):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # nothing may be looked up, offline or not
    value = value.format(tmp=tmp_path)
    fails_fast(SMOKE + paths + extra + [f"{key}='{value}'"], rf"^{key}='.*' does not exist \(a local path; it is not "
                                                         r"looked up on the Hugging Face Hub\)", limit_s=5)


def test_hub_ids_are_not_mistaken_for_paths():
    from matt.pipeline.preflight import looks_like_local_path

    for hub_id in ("HuggingFaceTB/SmolLM2-135M", "gpt2", "wikimedia/wikipedia", "HPLT/HPLT2.0_cleaned"):
        assert not looks_like_local_path(hub_id)
    for path in ("/abs/dir", "./rel", "../up", "~/home", "a/b/c", "corpus.jsonl", "C:\\data\\x"):
        assert looks_like_local_path(path)


# ------------------------------------------------------------------------------------------------
# the model
# ------------------------------------------------------------------------------------------------
def test_teacher_vocabulary_larger_than_the_embedding(paths, tmp_path):
    model_dir, big = tmp_path / "llama", tmp_path / "big_tokenizer"
    small = train_tokenizer(SAMPLE_TEXTS * 4, vocab_size=300)
    tiny_model("llama", len(small), num_hidden_layers=4).save_pretrained(str(model_dir))
    small.save_pretrained(str(model_dir))
    train_tokenizer(SAMPLE_TEXTS * 4, vocab_size=600).save_pretrained(str(big))
    overrides = SMOKE + paths + ["model=smollm2_135m", f"model.pretrained={model_dir}", "objective.n_layers=2"]
    assert preflight(compose("transfer", overrides)).depth == 4
    fails_fast(overrides + [f"model.tokenizer={big}"],
               r"model\.tokenizer \(.*big_tokenizer'\) has \d+ tokens, but the model .* has only \d+ embedding rows")


# ------------------------------------------------------------------------------------------------
# tracking
# ------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_tracking_server_is_named_quickly(paths):
    uri = f"http://127.0.0.1:{free_port()}"
    fails_fast(SMOKE + paths + ["tracking=mlflow_server", f"tracking.uri={uri}"],
               rf"tracking\.uri='{uri}': the MLflow tracking server does not answer", limit_s=15)


def test_silent_tracking_server_times_out(paths, monkeypatch):
    """A server that accepts the connection but never answers: the short timeout, not MLflow's retries."""
    import matt.tracking as tracking

    monkeypatch.setattr(tracking, "STORE_CHECK_TIMEOUT_S", 0.5)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        uri = f"http://127.0.0.1:{server.getsockname()[1]}"
        with pytest.raises(ValueError, match=rf"tracking\.uri='{uri}'.* within 0\.5 s"):
            tracking.check_store(uri, timeout=tracking.STORE_CHECK_TIMEOUT_S)


def test_unwritable_sqlite_location_is_named(paths, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    uri = f"sqlite:///{blocker / 'mlflow.db'}"
    fails_fast(SMOKE + paths + [f"tracking.uri={uri}"],
               rf"tracking\.uri='{uri}': cannot create or write the sqlite store in {blocker}")
    fails_fast(SMOKE + [f"paths.output_root={blocker / 'out'}", f"paths.cache_dir={tmp_path / 'cache'}"],
               r"paths\.output_root \(the embedded store\)=.*cannot create or write")

    import os

    import matt.tracking as tracking

    read_only = tmp_path / "read_only"  # a read-only mount (root ignores chmod, so emulate the check's answer)
    read_only.mkdir()
    real_access = os.access
    monkeypatch.setattr(tracking.os, "access", lambda path, mode: False if Path(path) == read_only
                        else real_access(path, mode))
    uri = f"sqlite:///{read_only / 'mlflow.db'}"
    fails_fast(SMOKE + paths + [f"tracking.uri={uri}"], rf"cannot create or write the sqlite store in {read_only}")
