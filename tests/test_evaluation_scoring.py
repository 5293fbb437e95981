"""Fast scoring (logits only at scored positions, shared contexts) == full-logit scoring, by hand."""

from __future__ import annotations

import math
import random

import pytest
import torch
from evaluation_helpers import ConstantLM

from matt.evaluation import scoring
from matt.evaluation.scoring import has_separate_head, score_continuations, token_nll
from matt.tiny import FAMILIES, tiny_model


def full_logit_token_nll(model, seq: list[int], num_context: int) -> list[float]:
    """One unpadded sequence, the model's own full logits, -log softmax written out in float64."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([seq])).logits[0].double()
    values = []
    for t in range(num_context, len(seq)):
        row = logits[t - 1].tolist()
        top = max(row)
        values.append(top + math.log(sum(math.exp(x - top) for x in row)) - row[seq[t]])
    return values


def random_sequences(vocab: int, lengths, seed: int = 0):
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


@pytest.mark.parametrize("family", FAMILIES)
def test_token_nll_on_scored_positions_equals_full_logits(family):
    vocab = 101
    model = tiny_model(family, vocab)
    assert has_separate_head(model)
    sequences = random_sequences(vocab, (2, 5, 17, 9, 30, 3, 12))  # gemma3's sliding window is 8
    contexts = [1, 4, 3, 8, 20, 1, 6]
    got = token_nll(model, sequences, contexts, batch_size=3, progress=False)
    for part, seq, n in zip(got, sequences, contexts):
        assert part.tolist() == pytest.approx(full_logit_token_nll(model, seq, n), rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_context_scoring_equals_scoring_each_concatenation(family):
    vocab = 89
    model = tiny_model(family, vocab)
    rng = random.Random(1)
    # Contexts of different lengths (left padding), some longer than gemma3's window of 8; options of
    # different lengths (right padding), one item with 3 options among items with 4.
    contexts = random_sequences(vocab, (3, 14, 1, 9, 22), seed=2)
    continuations = [[[rng.randrange(vocab) for _ in range(rng.randint(1, 7))] for _ in range(k)]
                     for k in (4, 4, 3, 4, 4)]
    for batch_size, rows_per_forward in ((2, 3), (5, 8), (1, 1)):  # chunks of rows that mix contexts
        got = score_continuations(model, contexts, continuations, batch_size=batch_size,
                                  rows_per_forward=rows_per_forward, progress=False)
        for context, options, parts in zip(contexts, continuations, got):
            assert len(parts) == len(options)
            for option, part in zip(options, parts):
                assert part.tolist() == pytest.approx(full_logit_token_nll(model, context + option, len(context)),
                                                      rel=1e-4, abs=1e-5)


def test_gemma_logit_softcapping_is_applied():
    model = tiny_model("gemma3", 61, final_logit_softcapping=0.5)  # a tiny cap: every logit is squashed
    seq = random_sequences(61, (12,))[0]
    got = token_nll(model, [seq], [1], progress=False)[0]
    assert got.tolist() == pytest.approx(full_logit_token_nll(model, seq, 1), rel=1e-4, abs=1e-5)
    assert float(got.max()) < math.log(61) + 1.0  # |logit| <= 0.5: nearly uniform


def test_logits_are_projected_in_chunks_without_changing_values(monkeypatch):
    model = tiny_model("llama", 97)
    sequences = random_sequences(97, (20, 11))
    whole = token_nll(model, sequences, [1, 1], progress=False)
    monkeypatch.setattr(scoring, "LOGIT_ELEMENTS_PER_CHUNK", 3 * 97)  # 3 rows per chunk
    chunked = token_nll(model, sequences, [1, 1], progress=False)
    for a, b in zip(whole, chunked):
        assert torch.allclose(a, b, atol=1e-6)


def test_unsupported_logit_post_processing_fails_loudly():
    model = tiny_model("llama", 50)
    original = model.forward

    def scaled_forward(*args, **kwargs):
        out = original(*args, **kwargs)
        out.logits = out.logits * 2.0
        return out

    model.forward = scaled_forward
    with pytest.raises(NotImplementedError, match="does not reproduce"):
        token_nll(model, [[1, 2, 3]], [1], progress=False)


def test_modules_without_a_separate_head_use_full_logits():
    model = ConstantLM(torch.tensor([0.0, 1.0, 2.0, 3.0]))
    assert not has_separate_head(model)
    parts = score_continuations(model, [[0, 1]], [[[2], [3, 3]]], progress=False)
    assert [p.tolist() for p in parts[0]] == [pytest.approx([-model.log_prob(2)]),
                                              pytest.approx([-model.log_prob(3)] * 2)]


def test_score_continuations_rejects_bad_input():
    model = tiny_model("llama", 20)
    with pytest.raises(ValueError, match="rows_per_forward"):
        score_continuations(model, [[1]], [[[2]]], rows_per_forward=0, progress=False)
    with pytest.raises(ValueError, match="contexts but"):
        score_continuations(model, [[1]], [], progress=False)
    with pytest.raises(ValueError, match="non-empty continuations"):
        score_continuations(model, [[1]], [[[2], []]], progress=False)
    with pytest.raises(ValueError, match="only 20 rows"):
        score_continuations(model, [[1]], [[[25]]], progress=False)


def test_evaluation_mode_lets_autocast_cast_each_weight_once():
    """Under `torch.inference_mode` autocast re-casts every weight on every call (its cache is off);
    `evaluation_mode` must keep the cache on, so a bf16 pass casts a layer's weight once."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from matt.evaluation.scoring import evaluation_mode

    class WeightCasts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            casts = (torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype)
            if func in casts and tuple(args[0].shape) == (4096, 8):
                self.count += 1
            return func(*args, **(kwargs or {}))

    layer = torch.nn.Linear(8, 4096, bias=False).train()
    x = torch.randn(2, 8)
    with evaluation_mode(layer), torch.autocast("cpu", dtype=torch.bfloat16), WeightCasts() as casts:
        first, second = layer(x), layer(x)
        assert not torch.is_grad_enabled() and not layer.training
    assert casts.count == 1 and first.dtype == torch.bfloat16 and torch.equal(first, second)
    assert layer.training  # the caller's mode is back
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16), WeightCasts() as uncached:
        layer(x), layer(x)
    assert uncached.count == 2  # what the test guards against
