"""`experiment=recover_known`: delete known rows, train them back, measure recovery against the truth.

Unit checks of the pieces (frequency ranks, deleting rows for each variant) against literal
readings, and the experiment end to end at tiny scale through the Hydra entry point: a tiny random
Llama, 20 deleted rows, AIM moves them towards the true rows (higher cosine, smaller distance) and
every number lands in MLflow under its `recover/...` key.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from hydra_helpers import recipe, run_app
from matt.initialization import embeddings_tied
from matt.pipeline.recover import delete_rows, frequent_token_ids
from matt.tiny import SAMPLE_TEXTS, tiny_model

transfer = recipe("transfer").main


def test_frequent_token_ids_are_the_literal_frequency_ranks(byte_level_tokenizer):
    texts = SAMPLE_TEXTS * 3 + SAMPLE_TEXTS[:2]
    counts = Counter()
    for text in texts:
        counts.update(byte_level_tokenizer.encode(text, add_special_tokens=False))
    specials = set(byte_level_tokenizer.all_special_ids)
    ranked = [t for t, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0])) if t not in specials]
    assert frequent_token_ids(byte_level_tokenizer, texts, 3, 13) == ranked[3:13]
    with pytest.raises(ValueError, match="recover.rank_end"):
        frequent_token_ids(byte_level_tokenizer, texts, 0, 10_000)
    with pytest.raises(ValueError, match="recover.rank_start"):
        frequent_token_ids(byte_level_tokenizer, texts, 5, 5)


@pytest.mark.parametrize("family,rows", [("llama", "input"), ("llama", "input_output"), ("qwen3", "input_output")])
def test_delete_rows(family, rows):
    """mean: the deleted rows become the mean of the real rows; `input` unties a tied model and keeps
    the true head; `input_output` deletes the head rows too (the same matrix when tied)."""
    vocab, real = 60, 55  # 5 padding rows beyond the tokenizer must not enter the mean
    model = tiny_model(family, vocab, seed=0)
    before_in = model.get_input_embeddings().weight.detach().clone()
    before_out = model.get_output_embeddings().weight.detach().clone()
    ids = [3, 7, 11, 40]
    deleted = delete_rows(model, ids, method="mean", rows=rows, num_real=real)
    after_in = model.get_input_embeddings().weight.detach()
    after_out = model.get_output_embeddings().weight.detach()
    others = [i for i in range(vocab) if i not in ids]
    assert torch.equal(after_in[others], before_in[others]) and torch.equal(after_out[others], before_out[others])
    expected_in = before_in[:real].double().mean(0).float()
    torch.testing.assert_close(after_in[ids], expected_in.expand(4, -1), rtol=0, atol=1e-6)
    assert torch.equal(deleted.true_input, before_in[ids]) and torch.equal(deleted.true_output, before_out[ids])
    if rows == "input":
        assert not embeddings_tied(model) and torch.equal(after_out[ids], before_out[ids])  # the LM head keeps the truth
    elif family == "llama":
        assert embeddings_tied(model) and torch.equal(after_out[ids], after_in[ids])
    else:
        expected_out = before_out[:real].double().mean(0).float()
        torch.testing.assert_close(after_out[ids], expected_out.expand(4, -1), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="init.method='focus'"):
        delete_rows(tiny_model(family, vocab), ids, method="focus", rows=rows, num_real=real)


def test_random_deletion_is_seeded():
    a, b = tiny_model("llama", 60), tiny_model("llama", 60)
    first = delete_rows(a, [1, 2, 3], method="random", rows="input_output", num_real=60, seed=4)
    again = delete_rows(b, [1, 2, 3], method="random", rows="input_output", num_real=60, seed=4)
    assert torch.equal(first.deleted_input, again.deleted_input)
    assert not torch.equal(first.deleted_input[0], first.deleted_input[1])


def run_tiny(tmp_path: Path, *overrides: str) -> tuple[dict, object]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HYDRA_FULL_ERROR", "1")
        run_app(transfer, ["experiment=recover_known_tiny", f"paths.output_root={tmp_path}",
                           f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}", *overrides])
    results = json.loads((tmp_path / "run" / "recover" / "results.json").read_text())
    client = MlflowClient(f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}")
    experiment = client.get_experiment_by_name("recover_known_tiny")
    (run,) = client.search_runs([experiment.experiment_id])
    return results, (client, run)


def test_aim_trains_deleted_rows_back_towards_the_true_rows(tmp_path):
    results, (client, run) = run_tiny(tmp_path)
    rows = results["rows"]
    first, last = rows[0], rows[-1]
    assert results["summary"]["num_rows"] == 20 and len(results["token_ids"]) == 20
    assert first["step"] == 0 and last["step"] == 20
    # the mean row has no preferred direction; AIM turns the rows towards the truth and closer to it
    assert abs(first["cosine_input"]) < 0.1 and last["cosine_input"] > first["cosine_input"] + 0.2
    assert last["distance_input"] < first["distance_input"]
    assert last["change_input"] > 0
    assert first["cosine_output"] == first["cosine_input"] and last["cosine_output"] == last["cosine_input"]  # tied
    # recovered = (deleted - bpb) / (deleted - untouched), from the logged numbers
    summary = results["summary"]
    gap = summary["bpb_deleted"] - summary["bpb_untouched"]
    assert last["recovered"] == pytest.approx((summary["bpb_deleted"] - last["bpb"]) / gap)
    assert [r["step"] for r in rows if "bpb" in r] == [0, 10, 20]
    metrics = run.data.metrics
    for key in ("bpb", "recovered", "cosine_input", "cosine_output", "distance_input", "bpb_untouched",
                "bpb_deleted", "final_bpb", "final_recovered", "final_cosine_input"):
        assert f"recover/{key}" in metrics, key
    assert [m.step for m in client.get_metric_history(run.info.run_id, "recover/bpb")] == [0, 10, 20]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "recover/cosine_input")] == [0, 5, 10, 15, 20]
    assert run.data.tags["matt.kind"] == "recover_known" and run.info.status == "FINISHED"


def test_input_only_variant_keeps_the_true_lm_head(tmp_path):
    results, _ = run_tiny(tmp_path, "recover.rows=input", "train.max_steps=10")
    rows = results["rows"]
    assert all(r["cosine_output"] == pytest.approx(1.0) and r["distance_output"] == 0 for r in rows)
    assert rows[-1]["cosine_input"] > rows[0]["cosine_input"]


def test_bad_recover_settings_fail_before_work(tmp_path):
    with pytest.raises(ValueError, match="init.method='subword_mean'"):
        run_tiny(tmp_path, "init=subword_mean")
    with pytest.raises(ValueError, match="recover.eval_every"):
        run_tiny(tmp_path, "recover.eval_every=7")
