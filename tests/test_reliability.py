"""Fault injection on tiny models (issue 12): divergence, unreadable checkpoints, cost across resumes,
failures during failure handling. Every test here failed before the fix it guards."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from matt import MATT, MATTConfig
from matt.initialization import build_student_model
from matt.modeling import adapter_for
from matt.tiny import SAMPLE_TEXTS, tiny_model
from matt.trainer import CHECKPOINT_FILE, PREVIOUS_CHECKPOINT_FILE, ROW_NORM_LIMIT

TEXTS = list(SAMPLE_TEXTS)  # 10 documents, batch 2: shuffling and epoch boundaries matter on resume


class Crash(Exception):
    pass


class Recorder:
    def __init__(self):
        self.rows: list[tuple[int, dict]] = []

    def __call__(self, metrics, step):
        self.rows.append((step, dict(metrics)))


def run(tmp_path, ckpt, teacher_tok, student_tok, *, resume=False, log_fns=(), grad_hook=None, on_student=None,
        **overrides):
    """One training run of a tiny Llama (fresh models, same seed every time)."""
    values = dict(max_steps=6, batch_size=2, lr=1e-2, shuffle=True, log_every_n_steps=1, max_length=64,
                  cache_dir=str(tmp_path / "cache"), progress_bar=False, num_warmup_steps=1,
                  num_decay_steps=2, checkpoint_dir=str(ckpt), save_every_n_steps=1, resume=resume)
    values.update(overrides)
    matt = MATT(config=MATTConfig(**values), teacher_tokenizer=teacher_tok, student_tokenizer=student_tok)
    matt.prepare_dataset(TEXTS)
    teacher_model = tiny_model("llama", len(teacher_tok))
    student_model, _ = build_student_model(teacher_model, teacher_tok, student_tok, "mean")
    adapter = adapter_for(teacher_model)
    student = adapter.from_pretrained(student_model, n_layers=2)
    if on_student is not None:
        on_student(student)
    if grad_hook is not None:
        for p in student.trainable_parameters():
            p.register_hook(grad_hook)
    rec = Recorder()
    result = matt.train(adapter.from_pretrained(teacher_model, n_layers=2), student, log_fns=[rec, *log_fns])
    return result, rec


def crash_at(step_to_crash):
    def log(metrics, step):
        if step == step_to_crash:
            raise Crash

    return log


def saved_step(ckpt) -> int:
    return json.loads((ckpt / "trainer_state.json").read_text())["step"]


@pytest.fixture
def tokenizers(byte_level_tokenizer, sentencepiece_tokenizer):
    return byte_level_tokenizer, sentencepiece_tokenizer


@pytest.fixture
def straight(tmp_path, tokenizers):
    """The uninterrupted 6-step run every interrupted one must reproduce."""
    return run(tmp_path, tmp_path / "straight", *tokenizers)


# ------------------------------------------------------------------------------------------------
# divergence
# ------------------------------------------------------------------------------------------------
def test_nan_gradient_at_step_k_leaves_step_k_minus_1_checkpoint_resumable(tmp_path, tokenizers, straight):
    """A NaN gradient in step 4 stops the run before AdamW writes it into the rows; the step-3
    checkpoint stays good (no NaN emergency save over it) and resuming reproduces the straight run."""
    calls = {"n": 0}

    def nan_in_step_4(grad):
        calls["n"] += 1
        return grad * float("nan") if calls["n"] == 4 else grad

    ckpt = tmp_path / "nan"
    with pytest.raises(FloatingPointError, match="Non-finite gradient norm .* at step 3"):
        run(tmp_path, ckpt, *tokenizers, grad_hook=nan_in_step_4)
    assert saved_step(ckpt) == 3
    state = torch.load(ckpt / CHECKPOINT_FILE, weights_only=False)
    assert all(torch.isfinite(t).all() for t in state["trainable"])
    resumed, rec = run(tmp_path, ckpt, *tokenizers, resume=True)
    assert [s for s, _ in rec.rows] == [4, 5, 6]
    torch.testing.assert_close(resumed.input_embeddings, straight[0].input_embeddings, rtol=0, atol=1e-6)


@pytest.mark.parametrize("value,message", [(float("inf"), "is non-finite"), (1e6, "the embedding rows diverged")])
def test_non_finite_or_diverged_state_never_replaces_a_good_checkpoint(tmp_path, tokenizers, value, message):
    """Rows poisoned right after step 3's update (as an overflowing or diverging update would leave them):
    neither the periodic nor the emergency save may write them; the step-2 checkpoint stays as it was."""
    ckpt = tmp_path / "poison"
    students, good = [], {}

    def poison_at_3(metrics, step):
        if step == 3:
            good["rows"] = torch.load(ckpt / CHECKPOINT_FILE, weights_only=False)["trainable"]
            with torch.no_grad():
                for p in students[0].trainable_parameters():
                    p.fill_(value)

    with pytest.raises(FloatingPointError, match=f"Not saving a checkpoint at step 3: .*{message}"):
        run(tmp_path, ckpt, *tokenizers, log_fns=[poison_at_3], on_student=students.append)
    assert saved_step(ckpt) == 2
    state = torch.load(ckpt / CHECKPOINT_FILE, weights_only=False)
    assert state["step"] == 2
    for saved, before in zip(state["trainable"], good["rows"]):
        assert torch.isfinite(saved).all() and torch.equal(saved, before)


def test_divergence_hidden_by_rmsnorm_stops_the_run(tmp_path, tokenizers):
    """lr=1e30: the AIM loss barely notices rows at 1e28 (RMSNorm divides the scale away), so without
    the row-norm watch the run 'finishes'; it must stop as diverged instead."""
    ckpt = tmp_path / "diverge"
    with pytest.raises(FloatingPointError, match="Diverged at step 1: .*teacher's largest"):
        run(tmp_path, ckpt, *tokenizers, lr=1e30, num_warmup_steps=0, gradient_clip_val=None)
    assert not (ckpt / CHECKPOINT_FILE).exists()  # no checkpoint of the diverged rows


def test_row_norms_are_logged_and_sane_in_a_normal_run(straight):
    _, rec = straight
    for _, metrics in rec.rows:
        assert 0 < metrics["embed_row_norm_mean"] <= metrics["embed_row_norm_max"]
        assert 0 < metrics["embed_row_norm_ratio"] < ROW_NORM_LIMIT / 10


# ------------------------------------------------------------------------------------------------
# checkpoints and resume
# ------------------------------------------------------------------------------------------------
def test_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path, tokenizers, straight, caplog):
    ckpt = tmp_path / "trunc"
    with pytest.raises(Crash):
        run(tmp_path, ckpt, *tokenizers, log_fns=[crash_at(4)])
    assert saved_step(ckpt) == 4 and (ckpt / PREVIOUS_CHECKPOINT_FILE).is_file()
    data = (ckpt / CHECKPOINT_FILE).read_bytes()
    (ckpt / CHECKPOINT_FILE).write_bytes(data[: len(data) // 2])  # a disk failure mid-write
    resumed, rec = run(tmp_path, ckpt, *tokenizers, resume=True)
    assert str(ckpt / CHECKPOINT_FILE) in caplog.text and "previous checkpoint" in caplog.text
    assert [s for s, _ in rec.rows] == [4, 5, 6]  # continued from step 3
    torch.testing.assert_close(resumed.input_embeddings, straight[0].input_embeddings, rtol=0, atol=1e-6)

    for name in (CHECKPOINT_FILE, PREVIOUS_CHECKPOINT_FILE):
        (ckpt / name).write_bytes(b"PK\x03\x04 not a checkpoint")
    with pytest.raises(ValueError, match=f"No readable checkpoint in {ckpt}.*{CHECKPOINT_FILE}"):
        run(tmp_path, ckpt, *tokenizers, resume=True)


def test_cost_accumulates_across_resumes_and_a_finished_run_resumes_as_a_no_op(tmp_path, tokenizers, straight):
    ckpt = tmp_path / "cost"

    backward_calls = []

    def slow_second_backward(grad):  # inside a training step: counted (log-function time is not)
        backward_calls.append(grad)
        if len(backward_calls) == 2:
            time.sleep(0.5)
        return grad

    with pytest.raises(Crash):
        run(tmp_path, ckpt, *tokenizers, log_fns=[crash_at(4)], grad_hook=slow_second_backward)
    resumed, _ = run(tmp_path, ckpt, *tokenizers, resume=True)
    assert resumed.metrics["flops"] == pytest.approx(straight[0].metrics["flops"], rel=1e-12)
    assert resumed.metrics["wall_clock_s"] >= 0.5 and resumed.metrics["elapsed_s"] >= 0.5

    again, rec = run(tmp_path, ckpt, *tokenizers, resume=True)
    assert rec.rows == []  # nothing trained, nothing logged
    assert again.metrics["steps"] == 6 and again.metrics["flops"] == resumed.metrics["flops"]
    assert 0.5 <= again.metrics["wall_clock_s"] <= resumed.metrics["wall_clock_s"]
    assert {k: v for k, v in again.metrics.items() if k != "wall_clock_s"} == {
        k: v for k, v in resumed.metrics.items() if k != "wall_clock_s"}
    assert torch.equal(again.input_embeddings, resumed.input_embeddings)


def test_a_failing_emergency_save_does_not_hide_the_real_error(tmp_path, tokenizers, monkeypatch):
    import matt.trainer as trainer_module

    def disk_full(*args, **kwargs):
        raise RuntimeError("PytorchStreamWriter failed writing file: unexpected pos")

    monkeypatch.setattr(trainer_module.torch, "save", disk_full)
    with pytest.raises(Crash):
        run(tmp_path, tmp_path / "full", *tokenizers, log_fns=[crash_at(2)], save_every_n_steps=0)


# ------------------------------------------------------------------------------------------------
# kill -9 (no exception handler runs): mid-run and mid-checkpoint, then resume
# ------------------------------------------------------------------------------------------------
KILLED_CHILD = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, sys.argv[4])
import matt.trainer as trainer
from matt.tiny import SAMPLE_TEXTS, train_tokenizer
from test_reliability import run

tmp, ckpt, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
teacher = train_tokenizer(SAMPLE_TEXTS * 4, vocab_size=400, style="byte_level")
student = train_tokenizer(SAMPLE_TEXTS * 4, vocab_size=350, style="sentencepiece")
kill = lambda: os.kill(os.getpid(), signal.SIGKILL)
log_fns = []
if mode == "mid_run":  # after step 4's update, before its checkpoint
    log_fns.append(lambda metrics, step: kill() if step == 4 else None)
else:  # the 4th checkpoint dies half-written
    real_save, calls = trainer.torch.save, [0]
    def save(obj, f):
        calls[0] += 1
        real_save(obj, f)
        if calls[0] == 4:
            data = Path(f).read_bytes()
            Path(f).write_bytes(data[: len(data) // 2])
            kill()
    trainer.torch.save = save
run(tmp, ckpt, teacher, student, log_fns=log_fns)
"""


@pytest.mark.parametrize("mode", ["mid_run", "mid_checkpoint"])
def test_kill_9_then_resume_equals_the_uninterrupted_run(tmp_path, tokenizers, straight, mode):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    ckpt = tmp_path / mode
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(tests.parent), os.environ.get("PYTHONPATH")]))}
    child = subprocess.run([sys.executable, "-c", KILLED_CHILD, str(tmp_path), str(ckpt), mode, str(tests)],
                           env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    assert saved_step(ckpt) == 3
    resumed, rec = run(tmp_path, ckpt, *tokenizers, resume=True)
    assert [s for s, _ in rec.rows] == [4, 5, 6]
    torch.testing.assert_close(resumed.input_embeddings, straight[0].input_embeddings, rtol=0, atol=1e-6)


def test_row_norms_match_the_definition_and_do_not_overflow():
    from matt.trainer import row_norms

    torch.manual_seed(0)
    weight = torch.randn(37, 16)
    weight[3] = 0.0
    expected = torch.tensor([math.sqrt(sum(float(x) ** 2 for x in row)) for row in weight])
    torch.testing.assert_close(row_norms(weight, chunk=5), expected, rtol=1e-6, atol=0)
    huge = torch.full((2, 64), 1e30)  # squares overflow float32; the norm (8e30) does not
    torch.testing.assert_close(row_norms(huge), torch.full((2,), 8e30), rtol=1e-6, atol=0)
    assert not torch.isfinite(row_norms(torch.tensor([[1.0, float("inf")]]))).any()
