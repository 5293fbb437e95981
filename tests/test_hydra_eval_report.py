"""The `eval` group glue (caps, one suite for every model, skips, lm-eval pass-through, caching)
and the report's table logic (direction-aware % of the original, per-run baselines)."""

from __future__ import annotations

import sys
import types

import pytest

from matt.hydra_app import compose
from matt.pipeline.documents import Documents
from matt.pipeline.evaluate import EvalSuite, cap_texts, prefixed, results_table
from matt.report import RunRecord, percent_of_baseline, recovery, table_columns, table_rows
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
    assert header == ["method", "model", "n_layers", "bpb", "bpb % of original", "bpb recovery %", "train time (s)",
                      "peak memory (MB)", "run"]
    percent = {cell[-1]: cell[4] for cell in cells if cell[2] is not None}
    assert percent["r1"] == pytest.approx(100 * 2.0 / 2.2) and percent["r3"] == pytest.approx(100 * 4.0 / 4.4)
    # recovery = (x - init) / (original - init), each run against its own original and init
    share = {(cell[0], cell[-1]): cell[5] for cell in cells}
    assert share[("aim mse L2", "r1")] == pytest.approx(100 * (2.2 - 2.5) / (2.0 - 2.5))  # 60 %
    assert share[("aim mse L4", "r2")] == pytest.approx(80.0)
    assert share[("aim mse L2", "r3")] == pytest.approx(100 * (4.4 - 5.0) / (4.0 - 5.0))
    assert share[("focus init", "r1")] == 0.0 and share[("original (m)", "r1")] == pytest.approx(100.0)


def test_recovery_by_hand():
    assert recovery(0.40, 0.50, 0.25) == pytest.approx(0.6)  # accuracy: 0.15 of a 0.25 gap
    assert recovery(1.415, 0.913, 1.475) == pytest.approx((1.415 - 1.475) / (0.913 - 1.475))  # the Gemma demo: 10.7 %
    assert recovery(0.2, 0.5, 0.25) == pytest.approx(-0.2)  # worse than the initialisation
    assert recovery(0.3, 0.25, 0.25) is None and recovery(None, 1.0, 2.0) is None
    assert recovery(float("nan"), 1.0, 2.0) is None


def accuracy_record(run_id, final_credits, init_credits, original_credits, with_items=True):
    from matt.evaluation.intervals import wilson_interval

    metrics = {}
    items = {}
    for kind, credits in (("original", original_credits), ("init", init_credits), ("final", final_credits)):
        low, high = wilson_interval(sum(credits), len(credits))
        metrics.update({f"{kind}/choice_accuracy": sum(credits) / len(credits),
                        f"{kind}/choice_accuracy_ci_low": low, f"{kind}/choice_accuracy_ci_high": high})
        items[kind] = {"choice_credits": credits}
    return RunRecord(run_id=run_id, name=run_id, status="FINISHED", label=f"aim {run_id}", model="m", init="focus",
                     n_layers=2, metrics=metrics, items=items if with_items else {})


def test_report_accuracy_intervals_recovery_and_paired_significance():
    from matt.evaluation.intervals import paired_bootstrap, wilson_interval

    original = [1.0] * 300 + [0.0] * 100           # 0.75
    init = [1.0] * 100 + [0.0] * 300               # 0.25
    better = [1.0] * 130 + [0.0] * 270             # 0.325: right on 30 more items, never worse than init
    rows = table_rows([accuracy_record("r1", better, init, original),
                       accuracy_record("r2", better, init, original, with_items=False)])
    header, cells = table_columns(rows, ["choice_accuracy"])
    assert header[3:8] == ["choice_accuracy", "choice_accuracy 95% CI", "choice_accuracy % of original",
                           "choice_accuracy recovery %", "choice_accuracy Δ vs init"]
    by_run = {(cell[0], cell[-1]): cell for cell in cells}
    trained = by_run[("aim r1", "r1")]
    low, high = wilson_interval(130, 400)
    assert trained[4] == f"[{low:.4f}, {high:.4f}]"
    assert trained[6] == pytest.approx(100 * (0.325 - 0.25) / (0.75 - 0.25))  # 15 %
    diff = paired_bootstrap(better, init)
    assert trained[7] == f"{diff.difference:+.4f} [{diff.low:+.4f}, {diff.high:+.4f}] *"
    assert diff.low > 0
    # Without per-item credits: the Wilson intervals of 0.325 and 0.25 overlap -> no star.
    assert by_run[("aim r2", "r2")][7] == "+0.0750 (Wilson)"
    assert by_run[("focus init", "r1")][7] is None


def test_results_table_prints_intervals_recovery_and_the_paired_difference():
    from matt.evaluation.intervals import paired_bootstrap

    def model(credits, bpb):
        return {"bpb": bpb, "choice_accuracy": sum(credits) / len(credits), "choice_accuracy_ci_low": 0.1,
                "choice_accuracy_ci_high": 0.9, "choice_credits": credits}

    results = {"original": model([1.0] * 30 + [0.0] * 10, 1.0), "init": model([1.0] * 10 + [0.0] * 30, 2.0),
               "final": model([1.0] * 10 + [0.0] * 30, 1.5)}
    table = results_table(results)
    lines = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()}
    assert "choice_credits" not in lines and "choice_accuracy_ci_low" not in lines
    assert "final recovery % (init → original)" in lines["metric"]
    assert lines["bpb"].endswith("| 50.0 | – |")  # 1.5 closes half of the 2.0 -> 1.0 gap; no per-item bpb
    diff = paired_bootstrap(results["final"]["choice_credits"], results["init"]["choice_credits"])
    assert (diff.difference, diff.low, diff.high) == (0.0, 0.0, 0.0)
    assert lines["choice_accuracy"].endswith("| 0.0 | +0.0000 [+0.0000, +0.0000] |")  # recovery 0 %, not significant
    assert "0.7500 [0.1000, 0.9000]" in lines["choice_accuracy"]
    assert prefixed(results)["final/choice_accuracy_ci_low"] == 0.1 and "final/choice_credits" not in prefixed(results)


def test_suite_with_both_tokenizers_splits_bits_per_byte(suite_setup):
    tokenizer, model, documents = suite_setup
    teacher = train_tokenizer(SAMPLE_TEXTS * 4, vocab_size=300)  # fewer merges: the student's extra ones are new
    cfg = compose("transfer", ["experiment=smoke", "eval=quick", "eval.choice.enabled=false",
                               "eval.generation.enabled=false"]).eval
    suite = EvalSuite.build(cfg, documents, teacher_tokenizer=teacher, student_tokenizer=tokenizer)
    fraction = suite.describe()["eval/new_byte_fraction"]
    assert 0.0 < fraction < 1.0
    results = suite.run(model, tokenizer)
    assert results["new_byte_fraction"] == pytest.approx(fraction)
    assert results["bpb"] == pytest.approx(fraction * results["bpb_new"] + (1 - fraction) * results["bpb_shared"])


def test_bits_per_byte_gets_a_document_interval_and_a_paired_difference():
    """With per-document bits and bytes (as `EvalSuite.run` stores them) the printed table and the
    report give the bits-per-byte difference to the init with a bootstrap interval over documents."""
    from matt.evaluation.intervals import ratio_bootstrap
    from matt.report import format_difference, paired_difference

    nbytes = [1200.0, 800.0, 3000.0, 450.0, 2200.0, 1500.0] * 3
    init_bits = [n * (1.4 + 0.05 * (k % 4)) for k, n in enumerate(nbytes)]
    final_bits = [x * 0.9 for x in init_bits]  # 10 % fewer bits on every document

    def model(bits):
        return {"bpb": sum(bits) / sum(nbytes), "bpb_document_bits": bits, "bpb_document_bytes": nbytes}

    results = {"original": model([n * 1.0 for n in nbytes]), "init": model(init_bits), "final": model(final_bits)}
    diff = paired_difference("bpb", results["final"], results["init"])
    assert diff == ratio_bootstrap(final_bits, nbytes, init_bits)
    assert diff.significant and diff.difference == pytest.approx(-0.1 * sum(init_bits) / sum(nbytes))
    lines = {line.split(" | ")[0].strip("| "): line for line in results_table(results).splitlines()}
    assert lines["bpb"].endswith(f"| {format_difference(diff)} |") and format_difference(diff).endswith(" *")
    assert "bpb_document_bits" not in lines and "final/bpb_document_bits" not in prefixed(results)
    # Documents that differ between the two models (another text) are not paired.
    other = dict(results["init"], bpb_document_bytes=nbytes[::-1])
    assert paired_difference("bpb", results["final"], other) is None
