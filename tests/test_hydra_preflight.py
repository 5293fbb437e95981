"""Bad configs fail before any heavy work (no MLflow run, no training) with a message that names
the key and the allowed values."""

from __future__ import annotations

import json
import re
import sys
import time

import pytest
import torch
from hydra.errors import ConfigCompositionException

from hydra_helpers import recipe, run_app
from matt.hydra_app import compose
from matt.pipeline.preflight import preflight
from matt.tiny import SAMPLE_TEXTS, tiny_model, train_tokenizer

transfer = recipe("transfer").main

SMOKE = ["experiment=smoke"]


@pytest.fixture
def paths(tmp_path):
    return [f"paths.output_root={tmp_path / 'out'}", f"paths.cache_dir={tmp_path / 'cache'}"]


@pytest.fixture(scope="module")
def slow_tokenizer_dir(tmp_path_factory):
    """A (Python, offset-less) ByT5 tokenizer saved to disk."""
    from transformers import ByT5Tokenizer

    path = tmp_path_factory.mktemp("byt5")
    ByT5Tokenizer().save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny Llama saved as a HF directory (what a local checkpoint or hub download looks like)."""
    path = tmp_path_factory.mktemp("llama")
    tokenizer = train_tokenizer(SAMPLE_TEXTS * 4, vocab_size=400)
    tiny_model("llama", len(tokenizer), num_hidden_layers=4).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def check(overrides, message):
    cfg = compose("transfer", overrides)
    with pytest.raises(ValueError, match=message):
        preflight(cfg)


def test_smoke_preset_passes(paths):
    plan = preflight(compose("transfer", SMOKE + paths))
    assert (plan.n_layers, plan.depth, plan.with_ntp) == (2, 6, False)
    assert plan.documents.summary() == {"train": 32, "validation": 8}


def test_n_layers_beyond_the_depth(paths):
    check(SMOKE + paths + ["objective.n_layers=7"], r"objective\.n_layers=7 is invalid for tiny_llama with 6 layers: "
                                                    r"choose an integer in \[1, 6\]")
    check(SMOKE + paths + ["objective.n_layers=0"], r"objective\.n_layers=0 .*\[1, 6\]")


def test_local_checkpoint_of_another_family(paths, llama_dir):
    overrides = SMOKE + paths + ["model=smollm2_135m", f"model.pretrained={llama_dir}", "objective.n_layers=2"]
    assert preflight(compose("transfer", overrides)).depth == 4  # a local HF directory works like a hub id
    check(overrides + ["model.family=gemma3"],
          r"model\.family='gemma3' does not match .*model_type is 'llama' \(that is family 'llama'\); "
          r"allowed families: \['llama', 'gemma3', 'mistral', 'qwen3', 'gpt_neox'\]")


def test_init_checkpoint_of_another_architecture(paths, tmp_path):
    from matt.result import TransferResult

    TransferResult(torch.zeros(10, 32)).save(tmp_path / "other")  # width 32, the tiny Llama has 64
    check(SMOKE + paths + ["init=checkpoint", f"init.checkpoint={tmp_path / 'other'}"],
          r"init\.checkpoint=.*width 32, but the model's hidden size is 64 \(teacher/student architecture mismatch")
    check(SMOKE + paths + ["init=checkpoint", f"init.checkpoint={tmp_path / 'nowhere'}"],
          r"init\.checkpoint=.*no embeddings\.safetensors")


def test_missing_data_column(paths, tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(json.dumps({"content": text}) for text in SAMPLE_TEXTS * 2))
    check(SMOKE + paths + ["data=local", f"data.path={data}"],
          r"data\.text_column='text' is not a column of .*docs\.jsonl; its columns are \['content'\]")
    plan = preflight(compose("transfer", SMOKE + paths + ["data=local", f"data.path={data}",
                                                          "data.text_column=content"]))
    assert plan.documents.train.column_names == ["text"]


def test_local_split_directory(paths, tmp_path):
    for split, n in (("train", 6), ("validation", 2), ("test", 2)):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in SAMPLE_TEXTS[:n]))
    plan = preflight(compose("transfer", SMOKE + paths + ["data=local", f"data.path={tmp_path}", "eval.split=test"]))
    assert plan.documents.summary() == {"train": 6, "validation": 2, "test": 2}
    check(SMOKE + paths + ["data=local", f"data.path={tmp_path}", "data.train_split=training"],
          r"data\.train_split='training': no training\.\{jsonl")


def test_tokenizers_without_offsets(paths, slow_tokenizer_dir):
    check(SMOKE + paths + ["tokenizer=pretrained", f"tokenizer.path={slow_tokenizer_dir}"],
          r"tokenizer\.path=.* is not a fast tokenizer")
    check(SMOKE + paths + ["model=smollm2_135m", f"model.pretrained={slow_tokenizer_dir}",
                           f"model.tokenizer={slow_tokenizer_dir}"],
          r"model\.tokenizer \(the teacher's.* is not a fast tokenizer")


def test_missing_mandatory_values_and_tracking_uri(paths, monkeypatch):
    check(SMOKE + paths + ["tokenizer=pretrained"], r"tokenizer=pretrained needs tokenizer\.path=")
    check(SMOKE + paths + ["init=checkpoint"], r"init=checkpoint needs init\.checkpoint=")
    check(SMOKE + paths + ["data=local"], r"Missing mandatory value\(s\): data\.path")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    check(SMOKE + paths + ["tracking=mlflow_server"], r"tracking=mlflow_server needs tracking\.uri")


def test_eval_split_that_does_not_exist(paths):
    check(SMOKE + paths + ["eval.split=test"], r"no test split: set data\.test_split")
    with pytest.raises(ConfigCompositionException) as excinfo:  # the schema's enum, while composing
        compose("transfer", SMOKE + paths + ["eval.split=dev"])
    assert re.search(r"Invalid value 'dev', expected one of \[validation, test, train\]\n\s+full_key: eval\.split",
                     str(excinfo.value.__cause__))


def test_training_values_are_checked_under_their_keys(paths):
    check(SMOKE + paths + ["train.batch_size=0"], r"^train\.batch_size=0 is invalid: must be a positive integer")
    check(SMOKE + paths + ["objective.output_embeddings=ntp"], r"^objective\.output_embeddings='ntp' is invalid")


def test_the_app_fails_before_any_run_or_heavy_work(tmp_path, monkeypatch):
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    out = tmp_path / "out"
    started = time.perf_counter()
    with pytest.raises(ValueError, match=r"objective\.n_layers=9"):
        run_app(transfer, SMOKE + [f"paths.output_root={out}", f"paths.cache_dir={tmp_path / 'cache'}",
                          "objective.n_layers=9", f"hydra.run.dir={out / 'run'}"])
    assert time.perf_counter() - started < 60
    assert not (out / "mlflow.db").exists()  # no MLflow run was opened
    assert not (tmp_path / "cache").exists()  # no tokenizer trained, no data prepared
    assert not (out / "run" / "checkpoints").exists()


def test_dry_run_validates_and_stops(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    out = tmp_path / "out"
    run_app(transfer, SMOKE + [f"paths.output_root={out}", "dry_run=true", f"hydra.run.dir={out / 'run'}"])
    assert "Config OK (dry run)" in capsys.readouterr().out
    assert not (out / "mlflow.db").exists()


def test_local_text_and_parquet_files_and_caps(paths, tmp_path):
    import datasets

    text_file = tmp_path / "corpus.txt"
    text_file.write_text("\n\n".join(SAMPLE_TEXTS) + "\n")
    plan = preflight(compose("transfer", SMOKE + paths + ["data=local", f"data.path={text_file}",
                                                          "data.text_sample_by=paragraph",
                                                          "data.validation_fraction=0.2"]))
    # 10 paragraphs (one text has an inner blank line, so 11) -> 80/20 split
    assert sum(plan.documents.summary().values()) == 11 and plan.documents.summary()["validation"] == 3

    parquet = tmp_path / "corpus.parquet"
    datasets.Dataset.from_dict({"body": [t * 3 for t in SAMPLE_TEXTS * 3]}).to_parquet(str(parquet))
    base = SMOKE + paths + ["data=local", f"data.path={parquet}", "data.text_column=body"]
    assert preflight(compose("transfer", base)).documents.summary() == {"train": 27, "validation": 3}
    assert preflight(compose("transfer", base + ["data.max_documents=5"])).documents.summary()["train"] == 5
    capped = preflight(compose("transfer", base + ["data.max_tokens=200"])).documents
    tokenizer = preflight(compose("transfer", SMOKE + paths)).teacher_tokenizer
    counts = [len(ids) for ids in tokenizer(list(capped.train["text"]), add_special_tokens=False)["input_ids"]]
    assert sum(counts) >= 200 and sum(counts[:-1]) < 200  # whole documents until the budget is reached


def test_hub_datasets_stream_only_what_is_needed(paths, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None, streaming=False, **kwargs):
        calls.append((path, name, split, streaming))
        rows = [{"text": f"{text} ({i})", "id": i} for i, text in enumerate(SAMPLE_TEXTS * 100)]
        if streaming:
            return datasets.IterableDataset.from_generator(lambda: iter(rows))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    plan = preflight(compose("transfer", SMOKE + paths + ["data=hplt_uk", "data.max_documents=50"]))
    assert calls == [("HPLT/HPLT2.0_cleaned", "ukr_Cyrl", "train", True)]
    assert plan.documents.summary() == {"train": 49, "validation": 1}  # 50 streamed, 2% held out
    check(SMOKE + paths + ["data=hplt_uk", "data.text_column=content"],
          r"data\.text_column='content' is not a column of HPLT/HPLT2\.0_cleaned")
    plan = preflight(compose("transfer", SMOKE + paths + ["data=hplt_uk", "data.streaming=false",
                                                          "data.max_documents=20"]))
    assert plan.documents.summary()["train"] == 20


def test_console_script_entry_point(tmp_path, monkeypatch, capsys):
    from matt import cli

    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    monkeypatch.setattr(sys, "argv", ["matt-transfer", *SMOKE, "dry_run=true", f"paths.output_root={tmp_path}",
                                      f"hydra.run.dir={tmp_path / 'run'}"])
    run_app(lambda _: cli.transfer(), None)
    assert "Config OK (dry run)" in capsys.readouterr().out


def test_model_family_is_checked_against_the_registry(paths, saved_families):
    from omegaconf import OmegaConf
    from transformers import Qwen2Config

    from matt.modeling import LlamaForAIM, register_adapter
    from matt.pipeline.preflight import check_family

    check(SMOKE + paths + ["model.family=llama2"],  # before the tiny model is built from it
          r"model\.family='llama2' is invalid: choose one of \['llama', 'gemma3', 'mistral', 'qwen3', 'gpt_neox'\]")
    model_cfg = OmegaConf.create({"family": "qwen2", "pretrained": "some/qwen2"})
    with pytest.raises(ValueError, match=r"model\.family='qwen2' is invalid: choose one of \[.*'gpt_neox'\]"):
        check_family(model_cfg, Qwen2Config())

    class Qwen2ForAIM(LlamaForAIM):
        model_types = ("qwen2",)

    register_adapter(Qwen2ForAIM)  # a family added at runtime passes the same check
    check_family(model_cfg, Qwen2Config())
    with pytest.raises(ValueError, match=r"model\.family='llama' .*model_type is 'qwen2' \(that is family 'qwen2'\); "
                                         r"allowed families: \[.*'gpt_neox', 'qwen2'\]"):
        check_family(OmegaConf.merge(model_cfg, {"family": "llama"}), Qwen2Config())
