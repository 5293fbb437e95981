"""`experiment=quality_gemma3` at test size (`quality_tiny`): every method of the comparison table
runs as one MLflow run, the probe logs its held-out diagnostics under stable keys, and the report
writes the table and the budget-curve PNG. Also the probe's pieces against obvious computations."""

from __future__ import annotations

import json

import pytest
import torch
from mlflow import MlflowClient

from hydra_helpers import recipe, run_app
from matt.pipeline.probe import HELDOUT_KEYS, new_segments, row_movement

report = recipe("report").main
transfer = recipe("transfer").main

METHODS = ["aim_head", "ntp", "aim_tied", "aim_keep_init", "hidden_head", "aim_star_head", "aim_mse_tied",
           "subword_mean_head"]
LABELS = {"aim_head": "AIM cos + NTP head", "ntp": "NTP", "aim_tied": "AIM cos tied",
          "aim_keep_init": "AIM cos keep_init", "hidden_head": "hidden cos + NTP head",
          "aim_star_head": "AIM* cos + NTP head", "aim_mse_tied": "AIM mse tied",
          "subword_mean_head": "AIM cos + NTP head (subword_mean init)"}


def test_row_movement_against_the_definitions():
    initial = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    rows = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    got = row_movement(rows, initial, reference_norm=2.0)
    assert got["row_norm"] == pytest.approx((5 + 2) / 2 / 2.0)
    assert got["row_cos_init"] == pytest.approx((1.0 + 0.0) / 2)
    assert got["row_change"] == pytest.approx((0 / 5 + 5 ** 0.5 / 1) / 2)
    assert row_movement(rows[:0], initial[:0], 1.0) == {}


def test_new_segments_marks_segments_holding_a_new_token():
    ids = torch.tensor([[5, 9, 2, 7, 0]])  # token 9 and 7 are new
    seg = torch.tensor([[0, 0, 1, 2, -100]])
    is_new = torch.zeros(10, dtype=torch.bool)
    is_new[[7, 9]] = True
    assert new_segments(ids, seg, is_new).tolist() == [[True, False, True]]


def test_heldout_aim_is_zero_at_identity_and_splits_by_new_tokens(tmp_path, byte_level_tokenizer,
                                                                  sentencepiece_tokenizer):
    """Teacher == student gives exactly 0 on every part; a student whose new rows differ from the
    teacher's loses more on pairs involving new tokens than on shared-only pairs."""
    from matt.batches import AIMCollator, pad_id, prepare_dataset
    from matt.initialization import build_student_model
    from matt.modeling import adapter_for
    from matt.overlap import token_overlap
    from matt.pipeline.probe import heldout_aim
    from matt.tiny import SAMPLE_TEXTS, tiny_model

    teacher_tok, student_tok = byte_level_tokenizer, sentencepiece_tokenizer
    teacher_model = tiny_model("llama", len(teacher_tok))
    overlap = token_overlap(teacher_tok, student_tok)
    student_model, _ = build_student_model(teacher_model, teacher_tok, student_tok, "random")
    adapter = adapter_for(teacher_model)
    same = prepare_dataset(SAMPLE_TEXTS[:4], teacher_tok, teacher_tok, max_length=64, cache_dir=tmp_path).dataset
    batch = AIMCollator(pad_id(teacher_tok), pad_id(teacher_tok))([same[i] for i in range(4)])
    teacher = adapter.from_pretrained(teacher_model, n_layers=2)
    twin = adapter.from_pretrained(tiny_model("llama", len(teacher_tok)), n_layers=2)
    some_new = torch.zeros(len(teacher_tok), dtype=torch.bool)
    some_new[::3] = True
    zero = heldout_aim(teacher, twin, [batch], some_new, torch.device("cpu"))
    assert set(zero) == {f"heldout_aim_{l}{p}" for l in ("mse", "cosine") for p in ("", "_new", "_shared")}
    assert all(v == 0.0 for v in zero.values()), zero

    student = adapter.from_pretrained(student_model, n_layers=2, frozen_embeddings_mask=overlap.frozen_mask())
    data = prepare_dataset(SAMPLE_TEXTS[:4], teacher_tok, student_tok, max_length=64, cache_dir=tmp_path).dataset
    batch = AIMCollator(pad_id(teacher_tok), pad_id(student_tok))([data[i] for i in range(4)])
    got = heldout_aim(teacher, student, [batch], ~overlap.frozen_mask(), torch.device("cpu"))
    assert got["heldout_aim_cosine_new"] > got["heldout_aim_cosine_shared"] > 0
    low, high = sorted([got["heldout_aim_mse_new"], got["heldout_aim_mse_shared"]])
    assert low <= got["heldout_aim_mse"] <= high  # the whole is a weighted mean of its parts


@pytest.fixture(scope="module")
def quality_sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HYDRA_FULL_ERROR", "1")
        run_app(transfer, ["-m", "experiment=quality_tiny", f"paths.output_root={root}",
                           f"paths.cache_dir={root / 'cache'}", f"hydra.sweep.dir={root / 'sweep'}"])
        run_app(report, ["experiment_name=quality_tiny", f"paths.output_root={root}",
                         f"hydra.run.dir={root / 'report'}"])
    client = MlflowClient(f"sqlite:///{(root / 'mlflow.db').resolve()}")
    experiment = client.get_experiment_by_name("quality_tiny")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    return root, client, runs


def test_every_method_of_the_table_is_one_finished_run(quality_sweep):
    _, _, runs = quality_sweep
    assert [r.data.tags["matt.label"] for r in runs] == [LABELS[m] for m in METHODS]
    assert {r.info.status for r in runs} == {"FINISHED"}
    by_label = {r.data.tags["matt.label"]: r for r in runs}
    assert by_label["NTP"].data.tags["matt.aim_impl"] == "none"
    assert by_label["AIM* cos + NTP head"].data.tags["matt.aim_impl"] == "aim_star"
    assert by_label["AIM cos + NTP head (subword_mean init)"].data.tags["matt.init"] == "subword_mean"
    for run in runs:  # evaluated on the configured split, every trained model
        assert "final/bpb" in run.data.metrics and "final/choice_accuracy" in run.data.metrics


def test_probe_logs_its_diagnostics_under_stable_keys(quality_sweep):
    root, client, runs = quality_sweep
    for run in runs:
        metrics = run.data.metrics
        for key in ("train_s", "heldout_bpb", "heldout_aim_mse", "heldout_aim_cosine", "heldout_aim_mse_new",
                    "heldout_aim_cosine_new", "heldout_aim_mse_shared", "heldout_aim_cosine_shared", "row_norm",
                    "row_cos_init", "row_change"):
            assert key in HELDOUT_KEYS + ("row_norm", "row_cos_init", "row_change")
            assert f"diag/{key}" in metrics, (run.data.tags["matt.label"], key)
        # held out at step 0, every 2 steps and the end; rows move away from their init
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "diag/heldout_bpb")]
        assert steps == [0, 2, 4, 6], steps
        change = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "diag/row_change")}
        cosine = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "diag/row_cos_init")}
        assert change[0] == 0.0 and cosine[0] == pytest.approx(1.0) and change[6] > 0
        train_s = [m.value for m in client.get_metric_history(run.info.run_id, "diag/train_s")]
        assert train_s[0] == 0.0 and all(a < b for a, b in zip(train_s, train_s[1:]))
        head = "diag/head_row_change" in metrics
        assert head == ("NTP head" in run.data.tags["matt.label"]), run.data.tags["matt.label"]
        # the same numbers as JSON lines next to the run
        rows = [json.loads(line) for line in (root / "sweep" / str(runs.index(run)) / "probe.jsonl")
                .read_text().splitlines()]
        assert [r["step"] for r in rows] == [0, 2, 4, 6]
        assert rows[-1]["heldout_bpb"] == pytest.approx(metrics["diag/heldout_bpb"])


def test_report_writes_the_table_and_budget_curves(quality_sweep):
    root, _, runs = quality_sweep
    directory = root / "reports" / "quality_tiny"
    table = (directory / "table.md").read_text()
    for label in LABELS.values():
        assert f"| {label} |" in table, label
    assert table.count("| original (tiny_gemma3) |") == 1  # one original row, whatever the runs' inits
    assert "| focus init |" in table and "| subword_mean init |" in table
    assert (directory / "budget_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    budget = (directory / "budget.md").read_text()
    assert all(f"| {label} | 6 |" in budget for label in LABELS.values())


def test_probe_settings_are_checked_before_any_work(tmp_path):
    from hydra import compose, initialize_config_dir

    from matt.hydra_app import setup
    from matt.pipeline.preflight import preflight

    cases = {"probe.every_n_steps=3": "probe.every_n_steps=3 must be a positive multiple",
             "probe.every_s=0": "probe.every_s=0.0 must be positive"}
    directory = setup()
    for override, message in cases.items():
        with initialize_config_dir(config_dir=str(directory), version_base=None):
            cfg = compose("transfer", overrides=["experiment=quality_tiny", override,
                                                 f"paths.output_root={tmp_path}"])
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            preflight(cfg)
