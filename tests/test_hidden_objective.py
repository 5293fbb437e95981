"""`objective=hidden`: hidden-state distillation at segment ends, at the output of the AIM layer.

The capture is checked against HF's own hidden states, the loss against a slow literal reading of
its definition, and the training loop for: exactly zero loss (and no movement) when teacher ==
student, gradients only on the trainable embedding rows, a falling loss. Also the trainer's
wall-clock budget (`max_wall_clock_s`), which gives a baseline another run's training time.
"""

from __future__ import annotations

import json

import pytest
import torch

from matt import MATT, MATTConfig
from matt.batches import AIMCollator
from matt.initialization import build_student_model
from matt.modeling import adapter_for
from matt.objectives import hidden_state_loss
from matt.tiny import SAMPLE_TEXTS, tiny_model
from model_helpers import padded_batch as _padded_batch

VOCAB = 97
TEXTS = SAMPLE_TEXTS[:4]


def padded_batch(seed: int = 0, length: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    return _padded_batch(VOCAB, seed, length)


# ---------------------------------------------------------------------------------------------
# capture
# ---------------------------------------------------------------------------------------------
def test_captured_hidden_states_are_the_aim_layer_output(family):
    """= HF's hidden_states[n_layers] (the output of decoder layer n_layers - 1), and the forward
    stops after that layer: no later layer runs."""
    model = tiny_model(family, VOCAB, seed=0)
    ids, mask = padded_batch()
    with torch.no_grad():
        model.set_attn_implementation("eager")
        reference = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[2]
        model.set_attn_implementation("sdpa")
    adapter = adapter_for(model)(model, n_layers=2, copy=True)
    full = adapter_for(model)(model, n_layers=2, with_ntp=True)
    with torch.no_grad():
        out = adapter(ids, mask, return_aim_hidden=True)
        both = full(ids, mask, return_logits=True, return_aim_hidden=True)
        plain = adapter(ids, mask)
    assert out.aim_hidden.dtype == torch.float32 and out.aim_hidden.shape == (3, 20, 64)
    torch.testing.assert_close(out.aim_hidden, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both.aim_hidden, reference, atol=1e-5, rtol=1e-5)
    assert both.logits is not None and plain.aim_hidden is None
    assert torch.equal(out.attn_probs, plain.attn_probs)


def test_forward_with_hidden_stops_after_the_aim_layer():
    model = tiny_model("llama", VOCAB, seed=0)
    adapter = adapter_for(model)(model, n_layers=2, with_ntp=True)  # all 4 layers present
    calls = []
    hooks = [layer.register_forward_pre_hook(lambda *_, i=i: calls.append(i))
             for i, layer in enumerate(adapter.get_layers())]
    ids, mask = padded_batch()
    adapter(ids, mask, return_aim_hidden=True)
    assert calls == [0, 1]  # layers 2 and 3 never start
    for hook in hooks:
        hook.remove()


# ---------------------------------------------------------------------------------------------
# the loss against its definition
# ---------------------------------------------------------------------------------------------
def literal_hidden_loss(t_hidden, t_seg, s_hidden, s_seg, loss):
    """Per row, per segment i: find its last token on each side by scanning, compare the two vectors."""
    terms, width = [], t_hidden.shape[-1]
    for b in range(t_hidden.shape[0]):
        for i in range(int(t_seg[b].max()) + 1):
            t_last = max(j for j in range(t_seg.shape[1]) if t_seg[b, j] == i)
            s_last = max(j for j in range(s_seg.shape[1]) if s_seg[b, j] == i)
            h, g = t_hidden[b, t_last].double(), s_hidden[b, s_last].double()
            if loss == "mse":
                terms.append(((h - g) ** 2).sum() / width)
            else:
                terms.append(1 - torch.dot(h, g) / (h.norm() * g.norm()))
    return torch.stack(terms).mean()


def random_case(seed: int = 0):
    """Teacher L=9, student L=6, 3 rows with 3 / 2 / 1 segments, BOS and padding without a segment."""
    g = torch.Generator().manual_seed(seed)
    t_seg = torch.tensor([[-100, 0, 0, 1, 1, 1, 2, 2, -100], [-100, 0, 1, 1, 1, -100, -100, -100, -100],
                          [-100, 0, 0, 0, 0, 0, 0, 0, 0]])
    s_seg = torch.tensor([[0, 1, 1, 2, -100, -100], [0, 0, 1, -100, -100, -100], [0, 0, -100, -100, -100, -100]])
    t_hidden = torch.randn(3, 9, 5, generator=g)
    s_hidden = torch.randn(3, 6, 5, generator=g, requires_grad=True)
    return t_hidden, t_seg, s_hidden, s_seg


@pytest.mark.parametrize("loss", ["mse", "cosine"])
def test_hidden_loss_matches_the_literal_definition_value_and_gradient(loss):
    t_hidden, t_seg, s_hidden, s_seg = random_case()
    value = hidden_state_loss(t_hidden, t_seg, s_hidden, s_seg, loss=loss)
    (grad,) = torch.autograd.grad(value, s_hidden)
    reference = literal_hidden_loss(t_hidden, t_seg, s_hidden, s_seg, loss)
    (ref_grad,) = torch.autograd.grad(reference, s_hidden)
    torch.testing.assert_close(value.double(), reference, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad.double(), ref_grad.double(), rtol=1e-5, atol=1e-7)
    assert grad[s_seg < 0].abs().sum() == 0  # padding / segment-less tokens get no gradient
    assert grad[0, 1].abs().sum() == 0  # not the last token of its segment


@pytest.mark.parametrize("loss", ["mse", "cosine"])
def test_hidden_loss_of_identical_sides_is_exactly_zero(loss):
    t_hidden, t_seg, _, _ = random_case()
    student = t_hidden.clone().requires_grad_(True)
    with torch.inference_mode():
        teacher = t_hidden.clone()  # an inference tensor, as the trainer's teacher output
    value = hidden_state_loss(teacher, t_seg, student, t_seg, loss=loss)
    assert value.item() == 0.0
    if loss == "mse":
        (grad,) = torch.autograd.grad(value, student)
        assert torch.count_nonzero(grad) == 0


def test_hidden_loss_errors_name_the_problem():
    t_hidden, t_seg, s_hidden, s_seg = random_case()
    with pytest.raises(ValueError, match="same segments"):
        hidden_state_loss(t_hidden, t_seg, s_hidden, s_seg.clamp(max=0), loss="mse")
    with pytest.raises(ValueError, match=r"hidden-state loss='l1' is invalid"):
        hidden_state_loss(t_hidden, t_seg, s_hidden, s_seg, loss="l1")
    with pytest.raises(ValueError, match="student_hidden must be"):
        hidden_state_loss(t_hidden, t_seg, s_hidden[0], s_seg)
    with pytest.raises(ValueError, match="width"):
        hidden_state_loss(t_hidden, t_seg, s_hidden[..., :4], s_seg)
    with pytest.raises(ValueError, match="no segments"):
        hidden_state_loss(t_hidden, torch.full_like(t_seg, -100), s_hidden, torch.full_like(s_seg, -100))


# ---------------------------------------------------------------------------------------------
# through the trainer
# ---------------------------------------------------------------------------------------------
def make_config(tmp_path, **overrides) -> MATTConfig:
    values = dict(max_steps=4, batch_size=4, lr=1e-2, shuffle=False, log_every_n_steps=1, max_length=64,
                  cache_dir=str(tmp_path / "cache"), progress_bar=False, aim_impl="hidden")
    values.update(overrides)
    return MATTConfig(**values)


class Recorder:
    def __init__(self):
        self.rows = []

    def __call__(self, metrics, step):
        self.rows.append((step, dict(metrics)))


def test_same_model_and_tokenizer_give_zero_loss_and_no_movement(tmp_path, byte_level_tokenizer):
    config = make_config(tmp_path, max_steps=2)
    matt = MATT(config=config, teacher_tokenizer=byte_level_tokenizer, student_tokenizer=byte_level_tokenizer)
    matt.prepare_dataset(list(TEXTS))
    model = tiny_model("llama", len(byte_level_tokenizer))
    teacher = adapter_for(model).from_pretrained(model, n_layers=2, copy=True)
    student = adapter_for(model).from_pretrained(model, n_layers=2, copy=True)
    before = student.input_embedding_weight().clone()
    rec = Recorder()
    result = matt.train(teacher, student, log_fns=[rec])
    assert [m["aim_loss"] for _, m in rec.rows] == [0.0, 0.0]
    assert torch.equal(result.input_embeddings, before)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_hidden_objective_trains_only_the_new_rows(tmp_path, family, byte_level_tokenizer, sentencepiece_tokenizer):
    config = make_config(tmp_path, max_steps=6, lr=1e-3)
    matt = MATT(config=config, teacher_tokenizer=byte_level_tokenizer, student_tokenizer=sentencepiece_tokenizer)
    matt.prepare_dataset(list(TEXTS))
    teacher_model = tiny_model(family, len(byte_level_tokenizer))
    student_model, _ = build_student_model(teacher_model, byte_level_tokenizer, sentencepiece_tokenizer, "mean")
    adapter = adapter_for(teacher_model)
    mask = matt.prepare_frozen_embeddings_mask()
    teacher = adapter.from_pretrained(teacher_model, n_layers=2)
    student = adapter.from_pretrained(student_model, n_layers=2, frozen_embeddings_mask=mask)

    # one backward by hand: the only parameter with a gradient is the trainable-row store
    collate = AIMCollator(byte_level_tokenizer.pad_token_id, sentencepiece_tokenizer.pad_token_id)
    rows = collate([matt.dataset[i] for i in range(4)])
    with torch.inference_mode():
        t_out = teacher(rows["teacher_input_ids"], rows["teacher_attention_mask"], return_aim_hidden=True)
    s_out = student(rows["student_input_ids"], rows["student_attention_mask"], return_aim_hidden=True)
    loss = hidden_state_loss(t_out.aim_hidden, rows["teacher_segment_ids"], s_out.aim_hidden,
                             rows["student_segment_ids"])
    loss.backward()
    with_grad = [name for name, p in student.named_parameters() if p.grad is not None]
    assert with_grad == ["causal_lm.model.embed_tokens.trainable"] and loss.item() > 0
    student.zero_grad(set_to_none=True)

    before = student.input_embedding_weight().clone()
    rec = Recorder()
    result = matt.train(teacher, student, log_fns=[rec])
    losses = [m["aim_loss"] for _, m in rec.rows]
    assert losses[-1] < 0.9 * losses[0], losses
    after = result.input_embeddings
    assert torch.equal(after[mask], before[mask]) and not torch.equal(after[~mask], before[~mask])


def test_wall_clock_budget_stops_at_a_step_boundary(tmp_path, byte_level_tokenizer, sentencepiece_tokenizer):
    """A spent budget ends training after the current step: logged, checkpointed, steps done recorded."""
    config = make_config(tmp_path, max_steps=50, aim_impl="aim", max_wall_clock_s=1e-9, log_every_n_steps=10,
                         checkpoint_dir=str(tmp_path / "ckpt"))
    matt = MATT(config=config, teacher_tokenizer=byte_level_tokenizer, student_tokenizer=sentencepiece_tokenizer)
    matt.prepare_dataset(list(TEXTS))
    teacher_model = tiny_model("llama", len(byte_level_tokenizer))
    student_model, _ = build_student_model(teacher_model, byte_level_tokenizer, sentencepiece_tokenizer, "mean")
    adapter = adapter_for(teacher_model)
    teacher = adapter.from_pretrained(teacher_model, n_layers=2)
    student = adapter.from_pretrained(student_model, n_layers=2, frozen_embeddings_mask=matt.prepare_frozen_embeddings_mask())
    rec = Recorder()
    result = matt.train(teacher, student, log_fns=[rec])
    assert result.metrics["steps"] == 1 and [step for step, _ in rec.rows] == [1]
    assert json.loads((tmp_path / "ckpt" / "trainer_state.json").read_text())["step"] == 1
    with pytest.raises(ValueError, match="max_wall_clock_s"):
        MATTConfig(max_wall_clock_s=0)


def test_hydra_objective_hidden_and_wall_clock_keys_compose():
    from hydra import compose, initialize_config_dir

    from matt.hydra_app import setup
    from matt.pipeline.config import matt_config

    directory = setup()
    with initialize_config_dir(config_dir=str(directory), version_base=None):
        cfg = compose("transfer", overrides=["experiment=smoke", "objective=hidden", "train.max_wall_clock_s=30"])
    mcfg = matt_config(cfg)
    assert mcfg.aim_impl == "hidden" and mcfg.loss == "mse" and mcfg.max_wall_clock_s == 30
    with initialize_config_dir(config_dir=str(directory), version_base=None):
        cfg = compose("transfer", overrides=["experiment=smoke", "train.max_wall_clock_s=-1"])
    with pytest.raises(ValueError, match="train.max_wall_clock_s"):
        matt_config(cfg)
