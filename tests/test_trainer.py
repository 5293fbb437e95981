"""End-to-end training through the public API on tiny models of every family."""

from __future__ import annotations

import pytest
import torch

from matt import MATT, MATTConfig, TransferResult
from matt.initialization import build_student_model
from matt.modeling import adapter_for
from matt.tiny import FAMILIES, SAMPLE_TEXTS, tiny_model

TEXTS = SAMPLE_TEXTS[:4]  # batch_size 4, no shuffle -> the same fixed batch every step


def make_config(tmp_path, **overrides) -> MATTConfig:
    values = dict(max_steps=6, batch_size=4, lr=1e-2, shuffle=False, log_every_n_steps=1,
                  max_length=64, cache_dir=str(tmp_path / "cache"), progress_bar=False)
    values.update(overrides)
    return MATTConfig(**values)


def setup_run(tmp_path, family, teacher_tok, student_tok, n_layers=2, with_ntp=False, freeze=True, **overrides):
    config = make_config(tmp_path, with_ntp=with_ntp, **overrides)
    matt = MATT(config=config, teacher_tokenizer=teacher_tok, student_tokenizer=student_tok)
    matt.prepare_dataset(list(TEXTS))
    teacher_model = tiny_model(family, len(teacher_tok))
    student_model, _ = build_student_model(teacher_model, teacher_tok, student_tok, "mean")
    adapter = adapter_for(teacher_model)
    mask = matt.prepare_frozen_embeddings_mask() if freeze else None
    teacher = adapter.from_pretrained(teacher_model, n_layers=n_layers)
    student = adapter.from_pretrained(student_model, n_layers=n_layers, frozen_embeddings_mask=mask,
                                      with_ntp=with_ntp)
    return matt, teacher, student


class Recorder:
    def __init__(self):
        self.rows: list[tuple[int, dict]] = []

    def __call__(self, metrics, step):
        self.rows.append((step, dict(metrics)))

    def series(self, key):
        return [m[key] for _, m in self.rows]


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_falls_on_a_fixed_batch(tmp_path, family, byte_level_tokenizer, sentencepiece_tokenizer):
    matt, teacher, student = setup_run(tmp_path, family, byte_level_tokenizer, sentencepiece_tokenizer)
    before = student.input_embedding_weight().clone()
    rec = Recorder()
    result = matt.train(teacher, student, log_fns=[rec])
    losses = rec.series("aim_loss")
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0], losses
    # shared (frozen) rows never move; new rows do
    mask = matt.prepare_frozen_embeddings_mask()
    after = result.input_embeddings
    assert torch.equal(after[mask], before[mask])
    assert not torch.equal(after[~mask], before[~mask])
    logged = [metrics for _, metrics in rec.rows]
    assert [m["lr"] for m in logged] == [1e-2] * 6  # no warmup or decay: the configured lr
    assert all(m["grad_norm"] > 0 and m["tokens_per_s"] > 0 and m["peak_memory_mb"] > 0 for m in logged)
    # the same batch every step: FLOPs add up in equal steps, elapsed time only grows
    flops, elapsed = rec.series("flops"), rec.series("elapsed_s")
    assert flops[0] > 0 and flops == pytest.approx([flops[0] * (k + 1) for k in range(6)])
    assert all(0 < a < b for a, b in zip(elapsed, elapsed[1:]))


@pytest.mark.parametrize("impl", ["aim", "aim_star"])
@pytest.mark.parametrize("loss", ["mse", "cosine"])
def test_same_tokenizer_and_embeddings_give_exactly_zero(tmp_path, impl, loss, byte_level_tokenizer):
    """Through the whole pipeline (data, adapters, trainer): identical sides give a loss of exactly 0.

    With mse the gradient at identity is exactly 0 too, so training never moves the student. The
    cosine gradient at identity is rounding noise (1 − cos is flat there), which Adam rescales to
    steps of ~lr, so only its first step is pinned."""
    steps = 3 if loss == "mse" else 1
    config = make_config(tmp_path, max_steps=steps, aim_impl=impl, loss=loss)
    matt = MATT(config=config, teacher_tokenizer=byte_level_tokenizer, student_tokenizer=byte_level_tokenizer)
    matt.prepare_dataset(list(TEXTS))
    model = tiny_model("llama", len(byte_level_tokenizer))
    teacher = adapter_for(model).from_pretrained(model, n_layers=2, copy=True)
    student = adapter_for(model).from_pretrained(model, n_layers=2, copy=True)
    before = student.input_embedding_weight().clone()
    rec = Recorder()
    result = matt.train(teacher, student, log_fns=[rec])
    assert rec.series("aim_loss") == [0.0] * steps
    if loss == "mse":
        assert torch.equal(result.input_embeddings, before)


def test_untied_qwen3_with_ntp_trains_the_head_with_scaled_ntp(tmp_path, byte_level_tokenizer, sentencepiece_tokenizer):
    matt, teacher, student = setup_run(tmp_path, "qwen3", byte_level_tokenizer, sentencepiece_tokenizer,
                                       with_ntp=True)
    head_before = student.output_embedding_weight().clone()
    rec = Recorder()
    result = matt.train(teacher, student, log_fns=[rec])
    assert result.tie_word_embeddings is False
    assert not torch.equal(result.output_embeddings, head_before)
    first = rec.rows[0][1]
    assert first["ntp_loss"] > 0
    assert first["ntp_scale"] == pytest.approx(first["aim_loss"] / first["ntp_loss"], rel=1e-4)
    assert first["loss"] == pytest.approx(2 * first["aim_loss"], rel=1e-4)  # aim + (aim/ntp)·ntp


def test_untied_model_without_ntp_keeps_its_initialised_head(tmp_path, byte_level_tokenizer, sentencepiece_tokenizer):
    matt, teacher, student = setup_run(tmp_path, "qwen3", byte_level_tokenizer, sentencepiece_tokenizer)
    head_before = student.output_embedding_weight().clone()
    result = matt.train(teacher, student)
    assert torch.equal(result.output_embeddings, head_before)


@pytest.mark.parametrize("mode", ["tied", "keep_init", "ntp"])
def test_output_side_of_tied_models(tmp_path, mode, byte_level_tokenizer, sentencepiece_tokenizer):
    matt, teacher, student = setup_run(tmp_path, "llama", byte_level_tokenizer, sentencepiece_tokenizer,
                                       with_ntp=mode == "ntp", output_embeddings=mode)
    init = student.input_embedding_weight().clone()
    result = matt.train(teacher, student)
    if mode == "tied":
        assert result.tie_word_embeddings and result.output_embeddings is None
    elif mode == "keep_init":
        assert not result.tie_word_embeddings
        assert torch.equal(result.output_embeddings, init)
        assert not torch.equal(result.input_embeddings, init)
    else:
        assert not result.tie_word_embeddings
        assert not torch.equal(result.output_embeddings, init)
        assert not torch.equal(result.output_embeddings, result.input_embeddings)


def test_ntp_scope_head_trains_the_head_and_leaves_input_embeddings_to_aim(tmp_path, byte_level_tokenizer,
                                                                              sentencepiece_tokenizer):
    """ntp_scope=head: the NTP term reaches only the LM head, so the input embeddings follow exactly the
    AIM-only trajectory (keep_init) while the head moves; with scope `all` NTP moves the inputs too."""
    runs = {}
    for name, overrides in {
        "aim_only": dict(output_embeddings="keep_init"),
        "head": dict(with_ntp=True, output_embeddings="ntp", ntp_scope="head"),
        "all": dict(with_ntp=True, output_embeddings="ntp", ntp_scope="all"),
    }.items():
        with_ntp = overrides.pop("with_ntp", False)
        matt, teacher, student = setup_run(tmp_path / name, "llama", byte_level_tokenizer, sentencepiece_tokenizer,
                                           with_ntp=with_ntp, gradient_clip_val=None, max_steps=3, **overrides)
        init = student.input_embedding_weight().clone()
        runs[name] = (matt.train(teacher, student), init)
    aim_only, head, every = (runs[k][0] for k in ("aim_only", "head", "all"))
    torch.testing.assert_close(head.input_embeddings, aim_only.input_embeddings, rtol=0, atol=1e-7)
    assert not torch.equal(head.output_embeddings, runs["head"][1])
    assert (every.input_embeddings - aim_only.input_embeddings).abs().max() > 1e-4


def test_resume_after_a_crash_continues_exactly(tmp_path, byte_level_tokenizer, sentencepiece_tokenizer):
    """6 steps straight == crash during step 5 + resume (optimizer, scheduler, data position, RNG)."""
    texts = list(SAMPLE_TEXTS)  # 10 docs, batch 2 -> shuffling and epoch boundaries matter

    class Crash(Exception):
        pass

    def crash_at_5(metrics, step):
        if step == 5:
            raise Crash

    def run(ckpt, resume=False, log_fns=()):
        config = make_config(tmp_path, max_steps=6, batch_size=2, shuffle=True, num_warmup_steps=2,
                             num_decay_steps=2, checkpoint_dir=str(ckpt), save_every_n_steps=2, resume=resume)
        matt = MATT(config=config, teacher_tokenizer=byte_level_tokenizer, student_tokenizer=sentencepiece_tokenizer)
        matt.prepare_dataset(texts)
        teacher_model = tiny_model("gemma3", len(byte_level_tokenizer))
        student_model, _ = build_student_model(teacher_model, byte_level_tokenizer, sentencepiece_tokenizer, "mean")
        adapter = adapter_for(teacher_model)
        rec = Recorder()
        result = matt.train(adapter.from_pretrained(teacher_model, n_layers=2),
                            adapter.from_pretrained(student_model, n_layers=2), log_fns=[rec, *log_fns])
        return result, rec

    straight, rec_straight = run(tmp_path / "a")
    with pytest.raises(Crash):
        run(tmp_path / "b", log_fns=[crash_at_5])
    # the crash happened after step 5's update: that step must not be lost
    import json

    assert json.loads((tmp_path / "b" / "trainer_state.json").read_text())["step"] == 5
    resumed, rec_resumed = run(tmp_path / "b", resume=True)
    assert [s for s, _ in rec_resumed.rows] == [6]
    assert rec_resumed.series("aim_loss") == pytest.approx([rec_straight.rows[-1][1]["aim_loss"]], rel=1e-5)
    assert torch.allclose(resumed.input_embeddings, straight.input_embeddings, atol=1e-6)


def test_apply_to_full_model_roundtrips_through_save_pretrained(tmp_path, byte_level_tokenizer, sentencepiece_tokenizer):
    from transformers import AutoModelForCausalLM

    matt, teacher, student = setup_run(tmp_path, "llama", byte_level_tokenizer, sentencepiece_tokenizer,
                                       output_embeddings="keep_init", max_steps=2)
    result = matt.train(teacher, student)
    result.save(tmp_path / "emb")
    loaded = TransferResult.load(tmp_path / "emb")
    assert torch.equal(loaded.input_embeddings, result.input_embeddings)
    full = tiny_model("llama", len(byte_level_tokenizer))
    loaded.apply_to(full)
    full.save_pretrained(tmp_path / "adapted")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "adapted")
    assert again.get_input_embeddings().weight.shape[0] == len(sentencepiece_tokenizer)
    assert torch.equal(again.get_input_embeddings().weight, result.input_embeddings)
    assert torch.equal(again.get_output_embeddings().weight, result.output_embeddings)
    ids = sentencepiece_tokenizer("Привіт, світе!", return_tensors="pt")["input_ids"]
    assert torch.isfinite(again(ids).logits).all()


def test_bad_inputs_fail_with_clear_errors(tmp_path, byte_level_tokenizer, sentencepiece_tokenizer):
    config = make_config(tmp_path)
    matt = MATT(config=config, teacher_tokenizer=byte_level_tokenizer, student_tokenizer=sentencepiece_tokenizer)
    with pytest.raises(ValueError, match="prepare_dataset"):
        matt.train(None, None)
    matt.prepare_dataset(list(TEXTS))
    teacher_model = tiny_model("llama", len(byte_level_tokenizer))
    small = tiny_model("llama", 50)  # fewer embedding rows than the student vocabulary
    with pytest.raises(ValueError, match="embedding rows"):
        matt.train(adapter_for(teacher_model).from_pretrained(teacher_model, n_layers=2),
                   adapter_for(small).from_pretrained(small, n_layers=2))
    teacher_model = tiny_model("llama", len(byte_level_tokenizer))
    other = tiny_model("llama", len(sentencepiece_tokenizer), hidden_size=32)
    with pytest.raises(ValueError, match="hidden_size"):
        matt.train(adapter_for(teacher_model).from_pretrained(teacher_model, n_layers=2),
                   adapter_for(other).from_pretrained(other, n_layers=2))


def test_time_in_log_functions_is_not_training_time(tmp_path, byte_level_tokenizer, sentencepiece_tokenizer):
    """An evaluation probe runs inside a log function: its time counts neither in `elapsed_s` /
    `wall_clock_s` nor against `max_wall_clock_s` (a 0.4 s probe per step, 0.3 s budget)."""
    import time

    matt, teacher, student = setup_run(tmp_path, "llama", byte_level_tokenizer, sentencepiece_tokenizer,
                                       max_steps=4, max_wall_clock_s=30.0)
    rec = Recorder()

    def slow_probe(metrics, step):
        time.sleep(0.4)

    result = matt.train(teacher, student, log_fns=[rec, slow_probe])
    assert result.metrics["steps"] == 4
    assert result.metrics["wall_clock_s"] < 1.2, result.metrics  # 4 probes = 1.6 s left out
    assert rec.series("elapsed_s")[-1] < 1.2
    matt2, teacher2, student2 = setup_run(tmp_path, "llama", byte_level_tokenizer, sentencepiece_tokenizer,
                                          max_steps=10, max_wall_clock_s=2.0)
    slow = matt2.train(teacher2, student2, log_fns=[slow_probe])
    step_s = slow.metrics["wall_clock_s"] / slow.metrics["steps"]
    # with the probe counted, the 2 s budget would end the run after 5 steps
    assert slow.metrics["steps"] == 10 or step_s > 0.2, slow.metrics


def test_next_token_loss_skips_padding_and_samples_an_unbiased_subset():
    """The NTP term equals F.cross_entropy over the real next-token positions; with `max_tokens` it is
    the same cross-entropy on a uniform subset of them (the mean over draws converges to the full loss)."""
    import torch.nn.functional as F

    from matt.trainer import next_token_loss

    torch.manual_seed(0)
    model = tiny_model("llama", 64)
    student = adapter_for(model).from_pretrained(model, with_ntp=True)
    ids = torch.randint(2, 64, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # padding: never scored
    mask[2, 5:] = 0
    with torch.no_grad():
        hidden = student(ids, mask, return_hidden_states=True).hidden_states
        logits = model.lm_head(hidden[:, :-1])
        labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        per_token = F.cross_entropy(logits.reshape(-1, 64), labels.reshape(-1), ignore_index=-100, reduction="none")
        real = (labels.reshape(-1) != -100).nonzero().squeeze(1)
        full = per_token[real].mean()
        torch.testing.assert_close(next_token_loss(student, hidden, ids, mask), full, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(next_token_loss(student, hidden, ids, mask, max_tokens=100), full,
                                   rtol=1e-5, atol=1e-6)  # more than there are: all of them
        torch.manual_seed(3)
        sampled = next_token_loss(student, hidden, ids, mask, max_tokens=5)
        torch.manual_seed(3)
        chosen = real[torch.randperm(real.numel())[:5]]
        torch.testing.assert_close(sampled, per_token[chosen].mean(), rtol=1e-5, atol=1e-6)
        draws = torch.stack([next_token_loss(student, hidden, ids, mask, max_tokens=5) for _ in range(400)])
    assert float(draws.std()) > 0  # really a sample
    assert float(draws.mean()) == pytest.approx(float(full), abs=4 * float(draws.std()) / 400 ** 0.5)


def test_ntp_max_tokens_is_validated():
    with pytest.raises(ValueError, match="objective.ntp_max_tokens=0"):
        MATTConfig(with_ntp=True, ntp_max_tokens=0)
