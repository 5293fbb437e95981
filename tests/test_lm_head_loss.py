"""Chunked LM-head cross-entropy (`matt.modeling.lm_head_loss`) against `F.cross_entropy` on full
logits: value, gradient on the trainable rows and on the hidden states, ignore_index, bias,
soft-capping, tied / untied / frozen heads, bf16 autocast, and the adapter + trainer wiring."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from devices import DEVICES
from torch import nn

from matt.modeling import PartlyFrozenEmbedding, adapter_for
from matt.modeling.embeddings import EmbeddingLMHead
from matt.modeling.lm_head_loss import lm_head_cross_entropy, linear_cross_entropy
from matt.tiny import tiny_model


def reference(hidden, frozen, trainable, targets, bias=None, softcap=None):
    """The literal definition: full logits over [frozen; trainable], then F.cross_entropy."""
    logits = hidden @ torch.cat([frozen, trainable]).T
    if bias is not None:
        logits = logits + bias
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets, ignore_index=-1)


def problem(seed, device, n=37, d=16, n_frozen=50, n_trainable=13, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=dtype).to(device).requires_grad_()
    frozen = torch.randn(n_frozen, d, generator=g, dtype=dtype).to(device)
    trainable = torch.randn(n_trainable, d, generator=g, dtype=dtype).to(device).requires_grad_()
    targets = torch.randint(0, n_frozen + n_trainable, (n,), generator=g)
    targets[::5] = -1  # ignored positions
    targets[1] = n_frozen  # at least one target in the trainable rows
    bias = torch.randn(n_frozen + n_trainable, generator=g, dtype=dtype).to(device)
    return hidden, frozen, trainable, targets.to(device), bias


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunks", [(8, 7), (1024, 8192), (1, 1)])
@pytest.mark.parametrize("with_bias,softcap", [(False, None), (True, None), (True, 3.0)])
def test_value_and_gradients_equal_full_logits_cross_entropy(device, chunks, with_bias, softcap):
    for seed in range(2):
        hidden, frozen, trainable, targets, bias = problem(seed, device, dtype=torch.float64)
        bias = bias if with_bias else None
        token_chunk, vocab_chunk = chunks
        value = linear_cross_entropy(hidden, frozen, trainable, targets, bias=bias, softcap=softcap,
                                     token_chunk=token_chunk, vocab_chunk=vocab_chunk)
        expected = reference(hidden, frozen, trainable, targets, bias, softcap)
        got_grads = torch.autograd.grad(value, [hidden, trainable])
        want_grads = torch.autograd.grad(expected, [hidden, trainable])
        torch.testing.assert_close(value, expected.to(value.dtype), rtol=1e-10, atol=1e-10)
        for got, want in zip(got_grads, want_grads):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        assert got_grads[1].abs().sum() > 0


@pytest.mark.parametrize("device", DEVICES)
def test_float32_and_degenerate_stores(device):
    hidden, frozen, trainable, targets, _ = problem(3, device)
    for f, t in ((frozen, trainable), (frozen, trainable[:0].detach().requires_grad_()),
                 (frozen[:0], trainable)):
        tgt = targets.clamp(max=f.shape[0] + t.shape[0] - 1)
        value = linear_cross_entropy(hidden, f, t, tgt, token_chunk=10, vocab_chunk=9)
        expected = reference(hidden, f, t, tgt)
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-5)
        for got, want in zip(torch.autograd.grad(value, [hidden, t]), torch.autograd.grad(expected, [hidden, t])):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_only_what_requires_grad_gets_a_gradient_and_all_ignored_is_nan():
    hidden, frozen, trainable, targets, _ = problem(4, "cpu")
    value = linear_cross_entropy(hidden.detach(), frozen, trainable, targets)
    (grad,) = torch.autograd.grad(value, [trainable])
    expected = reference(hidden.detach(), frozen, trainable, targets)
    torch.testing.assert_close(grad, torch.autograd.grad(expected, [trainable])[0], rtol=1e-5, atol=1e-6)
    nothing = torch.full_like(targets, -1)
    assert math.isnan(linear_cross_entropy(hidden, frozen, trainable, nothing).item())
    assert math.isnan(reference(hidden, frozen, trainable, nothing).item())


def test_errors_name_the_problem():
    hidden, frozen, trainable, targets, _ = problem(5, "cpu")
    with pytest.raises(IndexError, match="outside the 63 rows"):
        linear_cross_entropy(hidden, frozen, trainable, targets.clamp(min=0) + 63)
    with pytest.raises(ValueError, match="hidden size 16"):
        linear_cross_entropy(hidden, frozen[:, :3], trainable, targets)
    with pytest.raises(ValueError, match="positive"):
        linear_cross_entropy(hidden, frozen, trainable, targets, vocab_chunk=0)


# ------------------------------------------------------------------------------ LM head modules
def head_problem(seed, vocab=61, dim=12, padding_idx=None, bias=False):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, dim, generator=g)
    mask = torch.rand(vocab, generator=g) < 0.7
    table = PartlyFrozenEmbedding(weight, mask, padding_idx=padding_idx)
    head = EmbeddingLMHead(table, torch.randn(vocab, generator=g) if bias else None)
    hidden = torch.randn(3, 9, dim, generator=g).requires_grad_()
    labels = torch.randint(0, vocab, (3, 9), generator=g)
    labels[0, :4] = -100
    labels[2, 5] = int((~mask).nonzero()[0])  # a trainable target
    if padding_idx is not None:
        labels[1, 3] = padding_idx
    return head, hidden, labels


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("padding_idx,bias", [(None, False), (None, True), (0, False), (5, False)])
def test_embedding_head_equals_cross_entropy_of_its_logits(device, padding_idx, bias):
    head, hidden, labels = head_problem(0, padding_idx=padding_idx, bias=bias)
    head, hidden = head.to(device), hidden.detach().to(device).requires_grad_()
    labels = labels.to(device)
    value = lm_head_cross_entropy(head, hidden, labels, token_chunk=5, vocab_chunk=8)
    expected = F.cross_entropy(head(hidden).flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    params = [hidden, head.table.trainable]
    for got, want in zip(torch.autograd.grad(value, params), torch.autograd.grad(expected, params)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_padding_row_gradient_follows_the_lookup_it_replaces():
    """materialize() zeroes a trainable padding row's gradient (the table's padding_idx): so must we."""
    for seed in range(6):
        head, hidden, labels = head_problem(seed, padding_idx=7)
        if head.table.is_trainable[7]:
            break
    assert head.table.is_trainable[7], "pick a seed whose padding row trains"
    value = lm_head_cross_entropy(head, hidden.detach(), labels)
    (grad,) = torch.autograd.grad(value, [head.table.trainable])
    row = int(head.table.trainable_row[7])
    assert torch.count_nonzero(grad[row]) == 0 and grad.abs().sum() > 0


def test_frozen_and_trainable_linear_heads():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 7, 10, generator=g).requires_grad_()
    labels = torch.randint(0, 30, (2, 7), generator=g)
    labels[1, -1] = -100
    for trains in (False, True):
        head = nn.Linear(10, 30, bias=False).requires_grad_(trains)
        value = lm_head_cross_entropy(head, hidden, labels, vocab_chunk=4)
        expected = F.cross_entropy(head(hidden).flatten(0, 1), labels.flatten())
        params = [hidden, head.weight] if trains else [hidden]
        torch.testing.assert_close(value, expected)
        for got, want in zip(torch.autograd.grad(value, params), torch.autograd.grad(expected, params)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="EmbeddingLMHead"):
        lm_head_cross_entropy(nn.Linear(10, 30), hidden, labels)
    too_big = labels.clone()
    too_big[0, 0] = 30
    with pytest.raises(IndexError, match=r"\[0, 30\)"):
        lm_head_cross_entropy(head, hidden, too_big)
    with pytest.raises(ValueError, match="leading shape"):
        lm_head_cross_entropy(head, hidden, labels[:, 1:])


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_follows_f_linear(device):
    """Under autocast the products run in bf16 as F.linear's would; the softmax stays float32."""
    head, hidden, labels = head_problem(2)
    head, hidden, labels = head.to(device), hidden.detach().to(device).requires_grad_(), labels.to(device)
    with torch.autocast(device, dtype=torch.bfloat16):
        value = lm_head_cross_entropy(head, hidden, labels, vocab_chunk=16)
        expected = F.cross_entropy(head(hidden).flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, expected, rtol=1e-3, atol=1e-3)
    params = [hidden, head.table.trainable]
    for got, want in zip(torch.autograd.grad(value, params), torch.autograd.grad(expected, params)):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3)


# ------------------------------------------------------------------------------ adapters, trainer
@pytest.mark.parametrize("family,mode", [("llama", "tied"), ("llama", "ntp"), ("gemma3", "ntp"), ("qwen3", None)])
def test_adapter_loss_equals_cross_entropy_of_its_logits(family, mode):
    """`return_hidden_states` + `lm_head_loss` == F.cross_entropy on the adapter's own logits, for tied
    and untied heads (Gemma with its final soft-capping), including the input embeddings' gradient."""
    overrides = {"final_logit_softcapping": 2.0} if family == "gemma3" else {}
    model = tiny_model(family, 50, seed=0, **overrides)
    mask = torch.zeros(50, dtype=torch.bool)
    mask[:30] = True
    adapter = adapter_for(model)(model, n_layers=2, with_ntp=True, frozen_embeddings_mask=mask)
    if mode is not None:
        adapter.set_output_mode(mode)
    ids = torch.randint(0, 50, (2, 11), generator=torch.Generator().manual_seed(0))
    attention = torch.ones_like(ids)
    attention[1, -3:] = 0
    labels = ids.masked_fill(attention == 0, -100)[:, 1:]
    params = adapter.trainable_parameters()
    assert len(params) == (1 if mode == "tied" else 2)

    hidden = adapter(ids, attention, return_hidden_states=True).hidden_states
    value = adapter.lm_head_loss(hidden[:, :-1], labels)
    logits = adapter(ids, attention, return_logits=True).logits
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100)
    if family == "gemma3":  # the soft-capping is what makes it a different value
        raw = F.linear(hidden, adapter.get_output_embeddings().table.materialize())
        assert not torch.allclose(logits, raw) and torch.allclose(logits, 2.0 * torch.tanh(raw / 2.0), atol=1e-6)
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(torch.autograd.grad(value, params), torch.autograd.grad(expected, params)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
        assert want.abs().sum() > 0


def test_detached_head_input_runs_the_upper_layers_without_a_graph():
    model = tiny_model("llama", 50, seed=0)
    adapter = adapter_for(model)(model, n_layers=2, with_ntp=True)
    adapter.set_output_mode("ntp")
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(1))
    upper = []
    hook = adapter.get_layers()[2].register_forward_hook(lambda m, a, out: upper.append(out))
    out = adapter(ids, return_hidden_states=True, detach_head_input=True)
    hook.remove()
    assert not out.hidden_states.requires_grad and out.hidden_states.grad_fn is None
    assert upper[0].grad_fn is None  # the layer above the AIM layer recorded no graph
    assert out.attn_probs.grad_fn is not None  # AIM still trains the input embeddings
    value = adapter.lm_head_loss(out.hidden_states[:, :-1], ids[:, 1:])
    head_rows = adapter.get_output_embeddings().table.trainable
    grads = torch.autograd.grad(value, [head_rows, adapter.input_embeddings.trainable], allow_unused=True)
    assert grads[0].abs().sum() > 0 and grads[1] is None
    with_graph = adapter(ids, return_logits=True).logits
    torch.testing.assert_close(F.linear(out.hidden_states, adapter.get_output_embeddings().table.materialize()),
                               with_graph)
    with pytest.raises(ValueError, match="either return_logits or return_hidden_states"):
        adapter(ids, return_logits=True, return_hidden_states=True)


@pytest.mark.parametrize("device", DEVICES)
def test_training_with_the_ntp_head_under_bf16_autocast(tmp_path, device, byte_level_tokenizer,
                                                        sentencepiece_tokenizer):
    """Two trainer steps with the chunked NTP head on the device, under bf16 autocast: finite losses,
    the head's new rows move, its shared rows stay bit-identical."""
    from matt import MATT, MATTConfig
    from matt.initialization import build_student_model

    config = MATTConfig(max_steps=2, batch_size=4, lr=1e-2, shuffle=False, log_every_n_steps=1, max_length=64,
                        cache_dir=str(tmp_path / "cache"), progress_bar=False, precision="bf16-mixed",
                        cpu=device == "cpu", with_ntp=True, output_embeddings="ntp", ntp_scope="head")
    matt = MATT(config=config, teacher_tokenizer=byte_level_tokenizer, student_tokenizer=sentencepiece_tokenizer)
    matt.prepare_dataset(["Attention layers move information between tokens."] * 4)
    teacher_model = tiny_model("llama", len(byte_level_tokenizer))
    student_model, _ = build_student_model(teacher_model, byte_level_tokenizer, sentencepiece_tokenizer, "mean")
    adapter = adapter_for(teacher_model)
    mask = matt.prepare_frozen_embeddings_mask()
    teacher = adapter.from_pretrained(teacher_model, n_layers=2)
    student = adapter.from_pretrained(student_model, n_layers=2, frozen_embeddings_mask=mask, with_ntp=True)
    student.set_output_mode("ntp")
    before = student.output_embedding_weight().clone()
    metrics = []
    result = matt.train(teacher, student, log_fns=[lambda m, step: metrics.append(m)])
    assert len(metrics) == 2 and all(math.isfinite(m["ntp_loss"]) and m["ntp_loss"] > 0 for m in metrics)
    after = result.output_embeddings
    assert torch.equal(after[mask], before[mask].cpu())
    assert not torch.equal(after[~mask], before[~mask].cpu())
