"""The `eval` group glue (caps, one suite for every model, skips, lm-eval pass-through, caching)
and the report's table logic (direction-aware % of the original, per-run baselines)."""

from __future__ import annotations

import sys
import types

import pytest

from matt.hydra_app import compose
from matt.pipeline.data import Documents
from matt.pipeline.evaluate import EvalSuite, cap_texts, prefixed, results_table
from matt.report import RunRecord, percent_of_baseline, table_columns, table_rows
from matt.tiny import SAMPLE_TEXTS, tiny_model, train_tokenizer


def test_cap_texts_by_documents_and_bytes():
    texts = ["", "ab", "Привіт", "xyz"]
    assert cap_texts(texts, None, None) == ["ab", "Привіт", "xyz"]  # empty documents never count
    assert cap_texts(texts, 2, None) == ["ab", "Привіт"]
    # "Привіт" is 12 bytes: with 7 bytes left it is cut at a character boundary (3 letters = 6 bytes)
    assert cap_texts(texts, None, 9) == ["ab", "При"]
    assert sum(len(t.encode()) for t in cap_texts(texts * 10, None, 25)) <= 25
    # per-document heads, cut at a line break: every document still contributes
    lines = ["перший рядок\nдругий рядок\nтретій", "one\ntwo\nthree", "no-newline-here"]
    heads = cap_texts(lines, None, None, max_document_bytes=30)
    assert heads == ["перший рядок", "one\ntwo\nthree", "no-newline-here"]
    assert cap_texts(["ab\ncd"], None, None, max_document_bytes=3) == ["ab"]


def test_percent_of_baseline_is_direction_aware():
    assert percent_of_baseline("bpb", 2.0, 1.0) == pytest.approx(50.0)  # twice the bits: half as good
    assert percent_of_baseline("choice_accuracy", 0.3, 0.6) == pytest.approx(50.0)
    assert percent_of_baseline("lm_eval/belebele/acc", 0.5, 0.5) == pytest.approx(100.0)
    assert percent_of_baseline("bytes_per_token", 4.0, 2.0) is None  # compression is not "quality"
    assert percent_of_baseline("unigram_bpb", 1.5, 3.0) is None  # nor is the tokenizer's unigram floor
    assert percent_of_baseline("bpb", None, 1.0) is None and percent_of_baseline("chrf", 1.0, 0.0) is None


@pytest.fixture(scope="module")
def suite_setup():
    tokenizer = train_tokenizer(SAMPLE_TEXTS * 4, vocab_size=400)
    model = tiny_model("llama", len(tokenizer))
    import datasets

    held_out = [" ".join(SAMPLE_TEXTS[i:i + 4]) for i in range(6)]
    documents = Documents(train=datasets.Dataset.from_dict({"text": SAMPLE_TEXTS * 2}),
                          validation=datasets.Dataset.from_dict({"text": held_out}), test=None, source="unit")
    return tokenizer, model, documents


def test_one_suite_scores_every_model_on_the_same_items(suite_setup, tmp_path):
    tokenizer, model, documents = suite_setup
    cfg = compose("transfer", ["experiment=smoke", "eval=quick"]).eval
    suite = EvalSuite.build(cfg, documents)
    assert suite.texts == cap_texts(list(documents.validation["text"]), cfg.max_documents, cfg.max_bytes,
                                    cfg.max_document_bytes)
    assert suite.choice_items and suite.generation_items and not suite.skipped
    first = suite.run(model, tokenizer, name="a", cache_dir=tmp_path, cache_key={"m": 1})
    assert {"bpb", "bytes_per_token", "unigram_bpb", "choice_accuracy", "chrf", "eval_seconds"} <= set(first)
    again = suite.run(model, tokenizer, name="a", cache_dir=tmp_path, cache_key={"m": 1})
    assert again == first  # served from the cache (eval_seconds identical too)
    assert len(list((tmp_path / "eval").iterdir())) == 1
    table = results_table({"original": first, "final": first})
    assert "| bpb |" in table and "final % of original" in table and "| 100.0 |" in table
    assert prefixed({"final": {"bpb": 1.5}}) == {"final/bpb": 1.5}


def test_metrics_that_cannot_be_built_are_skipped_with_a_reason(suite_setup):
    tokenizer, _, _ = suite_setup
    import datasets

    one_sentence = Documents(train=datasets.Dataset.from_dict({"text": SAMPLE_TEXTS}),
                             validation=datasets.Dataset.from_dict({"text": ["Short one."]}), test=None, source="unit")
    suite = EvalSuite.build(compose("transfer", ["experiment=smoke", "eval=quick"]).eval, one_sentence)
    assert set(suite.skipped) == {"choice_accuracy", "chrf"}
    assert suite.describe()["eval/skipped_metrics"] == 2


def test_lm_eval_options_reach_the_bridge(suite_setup, monkeypatch):
    tokenizer, model, documents = suite_setup
    calls = []
    bridge = types.ModuleType("matt.evaluation.lm_eval_bridge")

    def run_lm_eval(model, tokenizer, tasks, *, include_path=None, num_fewshot=None, limit=None, batch_size=4,
                    device=None):
        calls.append(dict(tasks=tasks, include_path=include_path, num_fewshot=num_fewshot, limit=limit,
                          batch_size=batch_size, device=device))
        return {"belebele_ukr_Cyrl/acc,none": 0.5}

    bridge.run_lm_eval = run_lm_eval
    monkeypatch.setitem(sys.modules, "matt.evaluation.lm_eval_bridge", bridge)
    cfg = compose("transfer", ["experiment=smoke", "eval=lm_eval", "eval.bpb=false", "eval.compression=false",
                               "eval.unigram=false", "eval.choice.enabled=false", "eval.generation.enabled=false",
                               "eval.lm_eval.num_fewshot=5", "eval.lm_eval.limit=10", "eval.device=cpu"]).eval
    results = EvalSuite.build(cfg, documents).run(model, tokenizer)
    assert calls == [dict(tasks=["belebele_ukr_Cyrl"], include_path=None, num_fewshot=5, limit=10, batch_size=4,
                          device="cpu")]
    assert results["lm_eval/belebele_ukr_Cyrl/acc,none"] == 0.5
    from matt.tracking import metric_name

    assert metric_name("lm_eval/belebele_ukr_Cyrl/acc,none") == "lm_eval/belebele_ukr_Cyrl/acc_none"


def record(run_id, label, original_bpb, init_bpb, final_bpb, n_layers=2):
    metrics = {"original/bpb": original_bpb, "init/bpb": init_bpb, "final/bpb": final_bpb,
               "train/final_wall_clock_s": 10.0, "train/final_peak_memory_mb": 100.0}
    return RunRecord(run_id=run_id, name=run_id, status="FINISHED", label=label, model="m", init="focus",
                     n_layers=n_layers, metrics=metrics)


def test_report_rows_deduplicate_and_compare_with_their_own_original():
    runs = [record("r1", "aim mse L2", 2.0, 2.5, 2.2), record("r2", "aim mse L4", 2.0, 2.5, 2.1, n_layers=4),
            record("r3", "aim mse L2", 4.0, 5.0, 4.4)]  # r3: evaluated on other text
    rows = table_rows(runs)
    assert [(r.kind, r.method) for r in rows] == [
        ("original", "original (m)"), ("init", "focus init"), ("original", "original (m)"), ("init", "focus init"),
        ("trained", "aim mse L2"), ("trained", "aim mse L4"), ("trained", "aim mse L2")]
    header, cells = table_columns(rows, ["bpb"])
    assert header == ["method", "model", "n_layers", "bpb", "bpb % of original", "train time (s)",
                      "peak memory (MB)", "run"]
    percent = {cell[-1]: cell[4] for cell in cells if cell[2] is not None}
    assert percent["r1"] == pytest.approx(100 * 2.0 / 2.2) and percent["r3"] == pytest.approx(100 * 4.0 / 4.4)
