"""AIM objective: the O(B·H·L²) Gram-matrix implementation against the literal definition."""

from __future__ import annotations

import math
import random

import pytest
import torch
from devices import CUDA, DEVICES
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from matt.choices import Loss
from matt.objectives import AIM_IMPLS, aim_loss, naive_aim_loss, segment_last_positions

CASES = [(impl, loss) for impl in AIM_IMPLS for loss in Loss]


def make_seg(sizes_per_row: list[list[int]], bos: int, length: int) -> torch.Tensor:
    """Segment ids: `bos` special tokens, then the segments, then padding (all -100)."""
    seg = torch.full((len(sizes_per_row), length), -100, dtype=torch.long)
    for b, sizes in enumerate(sizes_per_row):
        pos = bos
        for i, n in enumerate(sizes):
            seg[b, pos:pos + n] = i
            pos += n
    return seg


def make_side(seg: torch.Tensor, heads: int, kv_heads: int, dim: int, dtype, gen: torch.Generator):
    """Random causal attention (leaf) and GQA-like values: (attn, kv leaf, values repeated to H)."""
    b, length = seg.shape
    logits = torch.randn(b, heads, length, length, generator=gen, dtype=dtype) * 2
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    attn = logits.masked_fill(~causal, float("-inf")).softmax(-1).requires_grad_()
    kv = torch.randn(b, kv_heads, length, dim, generator=gen, dtype=dtype).requires_grad_()
    return attn, kv, kv.repeat_interleave(heads // kv_heads, dim=1)


def random_problem(seed: int, dtype=torch.float32, heads: int = 4, kv_heads: int = 2, dim: int = 6):
    """B=3 rows with different segment counts, ragged segment sizes, BOS on the teacher side only,
    padding at the end and a different L on each side."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    n_segments = [rng.randint(1, 5) for _ in range(3)]
    t_sizes = [[rng.randint(1, 4) for _ in range(n)] for n in n_segments]
    s_sizes = [[rng.randint(1, 3) for _ in range(n)] for n in n_segments]
    t_seg = make_seg(t_sizes, bos=1, length=1 + max(map(sum, t_sizes)) + 2)
    s_seg = make_seg(s_sizes, bos=0, length=max(map(sum, s_sizes)) + 1)
    t_attn, _, t_values = make_side(t_seg, heads, kv_heads, dim, dtype, gen)
    s_attn, s_kv, s_values = make_side(s_seg, heads, kv_heads, dim, dtype, gen)
    return dict(t_attn=t_attn.detach(), t_values=t_values.detach(), t_seg=t_seg,
                s_attn=s_attn, s_kv=s_kv, s_values=s_values, s_seg=s_seg)


def longest_segment(seg: torch.Tensor) -> int:
    """Tokens in the longest segment of any row (B, L)."""
    return max(int(torch.bincount(row[row >= 0]).max()) for row in seg if (row >= 0).any())


def call(fn, p, **kw):
    return fn(p["t_attn"], p["t_values"], p["t_seg"], p["s_attn"], p["s_values"], p["s_seg"], **kw)


def to(p: dict, device: str) -> dict:
    return {k: v.to(device) for k, v in p.items()}


# --------------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("impl,loss", CASES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float64, 1e-11)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_efficient_matches_naive_value_and_gradients(impl, loss, dtype, tol, seed):
    p = random_problem(seed, dtype)
    grads = {}
    for name, fn in (("fast", aim_loss), ("naive", naive_aim_loss)):
        value = call(fn, p, impl=impl, loss=loss)
        assert value.dtype == dtype and value.ndim == 0
        grads[name] = (value, *torch.autograd.grad(value, [p["s_attn"], p["s_kv"]]))
    for fast, naive in zip(grads["fast"], grads["naive"]):
        torch.testing.assert_close(fast, naive, rtol=tol, atol=tol)
    assert grads["naive"][1].abs().sum() > 0 and grads["naive"][2].abs().sum() > 0


@pytest.mark.parametrize("device", [CUDA])
@pytest.mark.parametrize("impl,loss", CASES)
def test_efficient_matches_naive_on_the_device(device, impl, loss):
    """The same equivalence on the GPU (float32), and the device's value equals the CPU's."""
    for seed in range(2):
        p = random_problem(seed)
        t_attn, t_values, t_seg = p["t_attn"].to(device), p["t_values"].to(device), p["t_seg"].to(device)
        s_attn = p["s_attn"].detach().to(device).requires_grad_()
        s_kv = p["s_kv"].detach().to(device).requires_grad_()
        s_seg = p["s_seg"].to(device)
        results = []
        for fn in (aim_loss, naive_aim_loss):
            value = fn(t_attn, t_values, t_seg, s_attn, s_kv.repeat_interleave(2, dim=1), s_seg, impl=impl, loss=loss)
            results.append((value, *torch.autograd.grad(value, [s_attn, s_kv])))
        for fast, naive in zip(*results):
            torch.testing.assert_close(fast, naive, rtol=2e-5, atol=2e-5)
        cpu_value = call(aim_loss, p, impl=impl, loss=loss)
        torch.testing.assert_close(results[0][0].cpu(), cpu_value, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl,loss", CASES)
def test_identical_teacher_and_student_give_exactly_zero(device, impl, loss):
    for seed in range(4):
        p = to(random_problem(seed), device)
        for dtype in (torch.float32, torch.bfloat16):
            attn, values = p["t_attn"].to(dtype), p["t_values"].to(dtype) * 10 ** seed
            for fn in (aim_loss, naive_aim_loss):
                value = fn(attn, values, p["t_seg"], attn.clone(), values.clone(), p["t_seg"].clone(),
                           impl=impl, loss=loss)
                assert value.item() == 0.0, (fn.__name__, seed, dtype)


@pytest.mark.parametrize("impl", AIM_IMPLS)
def test_identical_sides_give_exactly_zero_mse_gradients(impl):
    """With mse, every gradient at identity is exactly 0 (not rounding noise): an optimizer such as
    Adam, which rescales any non-zero gradient to a step of ~lr, then leaves the student alone."""
    for seed in range(3):
        p = random_problem(seed)
        t_attn = p["t_attn"].clone().requires_grad_()
        t_kv = p["t_values"][:, ::2].clone().requires_grad_()  # KV heads shared by 2 query heads
        s_attn = t_attn.detach().clone().requires_grad_()
        s_kv = t_kv.detach().clone().requires_grad_()
        value = aim_loss(t_attn, t_kv.repeat_interleave(2, dim=1), p["t_seg"],
                         s_attn, s_kv.repeat_interleave(2, dim=1), p["t_seg"].clone(), impl=impl, loss="mse")
        grads = torch.autograd.grad(value, [t_attn, t_kv, s_attn, s_kv])
        assert value.item() == 0.0
        for grad in grads:
            assert torch.count_nonzero(grad) == 0, (seed, impl)


@pytest.mark.parametrize("impl,loss", CASES)
def test_teacher_side_gradients_match_naive(impl, loss):
    """The loss is symmetric in its two sides; a teacher that requires grad gets the right gradient."""
    p = random_problem(6)
    t_attn = p["t_attn"].clone().requires_grad_()
    t_values = p["t_values"].clone().requires_grad_()
    grads = [torch.autograd.grad(fn(t_attn, t_values, p["t_seg"], p["s_attn"], p["s_values"], p["s_seg"],
                                    impl=impl, loss=loss), [t_attn, t_values, p["s_attn"], p["s_kv"]])
             for fn in (aim_loss, naive_aim_loss)]
    for fast, naive in zip(*grads):
        torch.testing.assert_close(fast, naive, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("impl,loss", CASES)
def test_special_tokens_inside_segments_and_very_uneven_segments(impl, loss):
    """Segments are runs of tokens, but a special token (-100) may sit inside a run and one segment
    may be far longer than the others (the banded computation visits a whole run per token)."""
    gen = torch.Generator().manual_seed(11)
    t_seg = torch.tensor([[-100, 0, 0, -100, 0, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 3, -100],
                          [-100, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, -100, 2, -100, -100, -100, -100]])
    s_seg = torch.tensor([[0, 1, 2, -100, 2, 3, -100, -100],
                          [0, 0, 0, 1, 2, 2, -100, -100]])
    t_attn, _, t_values = make_side(t_seg, 4, 2, 5, torch.float64, gen)
    s_attn, s_kv, s_values = make_side(s_seg, 4, 2, 5, torch.float64, gen)
    t_attn = t_attn.detach().requires_grad_()
    grads = []
    for fn in (aim_loss, naive_aim_loss):
        value = fn(t_attn, t_values, t_seg, s_attn, s_values, s_seg, impl=impl, loss=loss)
        grads.append((value, *torch.autograd.grad(value, [t_attn, s_attn, s_kv])))
    for fast, naive in zip(*grads):
        torch.testing.assert_close(fast, naive, rtol=1e-10, atol=1e-12)


def width_classes(p) -> set[int]:
    """The width classes of the problem's key segments: the power of two at or above the token count
    on the longer side."""
    classes = set()
    for t_row, s_row in zip(p["t_seg"], p["s_seg"]):
        t_counts, s_counts = torch.bincount(t_row[t_row >= 0]), torch.bincount(s_row[s_row >= 0])
        classes |= {1 << (max(int(a), int(b)) - 1).bit_length() for a, b in zip(t_counts, s_counts)}
    return classes


@pytest.mark.parametrize("loss", list(Loss))
def test_key_chunking_does_not_change_the_result(monkeypatch, loss):
    """Key segments are grouped by width class and processed in chunks of at most `CHUNK_ELEMENTS`
    query-tensor entries (at least one key): one key per chunk, a few, and one chunk per class give the
    same value and gradients."""
    import matt.objectives as objectives

    p = random_problem(7, torch.float64)
    t_attn = p["t_attn"].clone().requires_grad_()  # the teacher's backward is chunked too
    results, chunks = [], []
    real_key_chunks = objectives._key_chunks

    def recording(*args):
        found = real_key_chunks(*args)
        chunks.append(found)
        return found

    monkeypatch.setattr(objectives, "_key_chunks", recording)
    n_keys = sum(int(row.max()) + 1 for row in p["t_seg"])
    n_classes = len(width_classes(p))
    for budget in (1, 64, 2**30):
        monkeypatch.setattr(objectives, "CHUNK_ELEMENTS", budget)
        value = aim_loss(t_attn, p["t_values"], p["t_seg"], p["s_attn"], p["s_values"], p["s_seg"], loss=loss)
        results.append((value, *torch.autograd.grad(value, [t_attn, p["s_attn"], p["s_kv"]])))
    sizes = [[c.size for c in found] for found in chunks]  # planned once per call (the backward reuses it)
    assert sizes[0] == [1] * n_keys
    assert n_classes < len(sizes[1]) < n_keys and sum(sizes[1]) == n_keys
    assert len(sizes[2]) == n_classes > 1 and sum(sizes[2]) == n_keys
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("loss", list(Loss))
def test_many_key_chunks_match_naive(monkeypatch, loss):
    """A longer problem split into several chunks of key segments over several width classes, against
    the literal definition: value and the gradients of both sides (a chunk only sees the query rows
    from its first key segment on)."""
    import matt.objectives as objectives

    monkeypatch.setattr(objectives, "CHUNK_ELEMENTS", 2**9)
    rng, gen = random.Random(3), torch.Generator().manual_seed(3)
    n_segments = [14, 9]
    t_seg = make_seg([[rng.randint(1, 5) for _ in range(n)] for n in n_segments], bos=1, length=60)
    s_seg = make_seg([[rng.randint(1, 3) for _ in range(n)] for n in n_segments], bos=0, length=40)
    t_attn, _, t_values = make_side(t_seg, 4, 2, 6, torch.float64, gen)
    s_attn, s_kv, s_values = make_side(s_seg, 4, 2, 6, torch.float64, gen)
    t_attn, t_values = t_attn.detach().requires_grad_(), t_values.detach().requires_grad_()
    mask = objectives.pair_mask(objectives.segment_last_positions(t_seg)[1])
    chunks = objectives._key_chunks(t_seg, s_seg, mask, 4)
    assert len(chunks) >= 2 * len({c.width for c in chunks}) >= 6  # several per class
    results = []
    for fn in (aim_loss, naive_aim_loss):
        value = fn(t_attn, t_values, t_seg, s_attn, s_values, s_seg, loss=loss)
        results.append((value, *torch.autograd.grad(value, [t_attn, t_values, s_attn, s_kv])))
    for fast, naive in zip(*results):
        torch.testing.assert_close(fast, naive, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("impl,loss", CASES)
def test_different_teacher_and_student_give_positive_loss(impl, loss):
    p = random_problem(3)
    assert call(aim_loss, p, impl=impl, loss=loss).item() > 1e-3


# ------------------------------------------------------------------------------- hand-computed
def tiny_case():
    """L=3, H=1, D=2. Teacher: [BOS, a, b] with seg [-100, 0, 1]; student: [a1, a2, b], seg [0, 0, 1]."""
    t_attn = torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0], [0.2, 0.3, 0.5]])[None, None]
    t_values = torch.tensor([[1.0, 0], [0, 1], [1, 1]])[None, None]
    s_attn = torch.tensor([[1.0, 0, 0], [0.6, 0.4, 0], [0.1, 0.1, 0.8]])[None, None]
    s_values = torch.tensor([[2.0, 0], [0, 1], [1, 0]])[None, None]
    return t_attn, t_values, torch.tensor([[-100, 0, 1]]), s_attn, s_values, torch.tensor([[0, 0, 1]])


def one_minus_cos(x, y):
    return 1 - sum(a * b for a, b in zip(x, y)) / (math.hypot(*x) * math.hypot(*y))


# aim pairs (i,k): teacher s = (0,.5) (0,.3) (.5,.5); student s' = (1.2,.4) (.2,.1) (.8,0).
# The BOS token (value (1,0), weight .2 in row 2) belongs to no segment, so aim ignores it.
AIM_PAIRS = [((0, 0.5), (1.2, 0.4)), ((0, 0.3), (0.2, 0.1)), ((0.5, 0.5), (0.8, 0))]
# aim_star: the attention outputs at t_0 = 1 and t_1 = 2, BOS included: (.5,.5) (.7,.8) vs (1.2,.4) (1,.1)
STAR_PAIRS = [((0.5, 0.5), (1.2, 0.4)), ((0.7, 0.8), (1.0, 0.1))]
EXPECTED = {
    ("aim", "mse"): (1.2**2 + 0.1**2 + 0.2**2 + 0.2**2 + 0.3**2 + 0.5**2) / 6,
    ("aim", "cosine"): sum(one_minus_cos(x, y) for x, y in AIM_PAIRS) / 3,
    ("aim_star", "mse"): (0.7**2 + 0.1**2 + 0.3**2 + 0.7**2) / 4,
    ("aim_star", "cosine"): sum(one_minus_cos(x, y) for x, y in STAR_PAIRS) / 2,
}


@pytest.mark.parametrize("fn", [aim_loss, naive_aim_loss])
@pytest.mark.parametrize("impl,loss", CASES)
def test_hand_computed_tiny_case(fn, impl, loss):
    value = fn(*tiny_case(), impl=impl, loss=loss)
    assert value.item() == pytest.approx(EXPECTED[impl, loss], rel=1e-6)


def test_cosine_of_zero_vectors():
    t_attn, t_values, t_seg, s_attn, s_values, s_seg = tiny_case()
    zeros_t, zeros_s = torch.zeros_like(t_values), torch.zeros_like(s_values)
    for fn in (aim_loss, naive_aim_loss):
        # both sides all-zero: identical, so no loss
        assert fn(t_attn, zeros_t, t_seg, s_attn, zeros_s, s_seg, loss="cosine").item() == 0.0
        # zero teacher against a non-zero student: maximal disagreement, 1 − cos ≈ 1
        value = fn(t_attn, zeros_t, t_seg, s_attn, s_values, s_seg, loss="cosine")
        assert value.item() == pytest.approx(1.0, abs=1e-5)


def test_segment_last_positions():
    seg = torch.tensor([[-100, 0, 0, 1, -100, -100], [0, 1, 1, 2, 2, -100]])
    positions, valid = segment_last_positions(seg)
    assert positions.tolist() == [[2, 3, 0], [0, 2, 4]]
    assert valid.tolist() == [[True, True, False], [True, True, True]]
    positions, valid = segment_last_positions(torch.full((2, 3), -100))
    assert positions.shape == valid.shape == (2, 0)


# ---------------------------------------------------------------------- precision and autograd
@pytest.mark.parametrize("impl,loss", CASES)
def test_autocast_and_bf16_inputs_are_computed_in_float32(impl, loss):
    p = random_problem(4)
    reference = call(aim_loss, p, impl=impl, loss=loss)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = call(aim_loss, p, impl=impl, loss=loss)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, reference, rtol=1e-6, atol=1e-7)

    bf16 = {k: (v.detach().bfloat16() if v.is_floating_point() else v) for k, v in p.items()}
    upcast = {k: (v.float() if v.is_floating_point() else v) for k, v in bf16.items()}
    bf16["s_attn"].requires_grad_()
    upcast["s_attn"] = upcast["s_attn"].requires_grad_()
    value = call(aim_loss, bf16, impl=impl, loss=loss)
    assert value.dtype == torch.float32
    reference = call(aim_loss, upcast, impl=impl, loss=loss)
    torch.testing.assert_close(value, reference, rtol=1e-6, atol=1e-7)
    (grad,) = torch.autograd.grad(value, [bf16["s_attn"]])
    (grad_reference,) = torch.autograd.grad(reference, [upcast["s_attn"]])
    assert grad.dtype == torch.bfloat16  # the attention's own dtype
    torch.testing.assert_close(grad, grad_reference.bfloat16())


@pytest.mark.parametrize("impl,loss", CASES)
def test_teacher_inference_tensors(impl, loss):
    p = random_problem(5)
    with torch.inference_mode():
        t_attn, t_values = p["t_attn"] * 1, p["t_values"] * 1
    assert t_attn.is_inference() and t_values.is_inference()
    for fn in (aim_loss, naive_aim_loss):
        value = fn(t_attn, t_values, p["t_seg"], p["s_attn"], p["s_values"], p["s_seg"], impl=impl, loss=loss)
        grad_attn, grad_kv = torch.autograd.grad(value, [p["s_attn"], p["s_kv"]])
        assert torch.isfinite(grad_attn).all() and grad_kv.abs().sum() > 0


# ------------------------------------------------------------------------------------- memory
class LargestTensor(TorchDispatchMode):
    """Records the element count of every tensor any op (forward or backward) produces."""

    def __init__(self):
        super().__init__()
        self.largest, self.ops = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_efficient_path_never_allocates_pairwise_value_tensors():
    """L² · D and B·H·S²·D dwarf everything O(B·H·L²), O(B·H·L·D) or O(B·H·S·L) here. (The per-slot
    tensors, B·H·S·w·S query entries and B·H·S·w·D values with w = 2 tokens per segment, fit too.)"""
    batch, heads, dim, n_segments = 1, 2, 64, 12
    seg = make_seg([[2] * n_segments], bos=1, length=2 * n_segments + 1)  # L = 25
    length = seg.shape[1]
    gen = torch.Generator().manual_seed(0)
    t_attn, _, t_values = make_side(seg, heads, heads, dim, torch.float32, gen)
    s_attn, s_kv, s_values = make_side(seg, heads, heads, dim, torch.float32, gen)
    forbidden = min(length**2 * dim, batch * heads * n_segments**2 * dim)
    # (the token-major layouts carry one zero row for empty slots: L + 1 rows)
    allowed = max(batch * heads * length**2, batch * heads * (length + 1) * dim, batch * heads * n_segments * length)
    assert allowed < forbidden / 4

    for loss in Loss:
        with LargestTensor() as fast:
            value = aim_loss(t_attn.detach(), t_values.detach(), seg, s_attn, s_values, seg, loss=loss)
            forward_ops = fast.ops
            torch.autograd.grad(value, [s_attn, s_kv])
        assert fast.ops > forward_ops, "backward ops were not recorded"
        assert fast.largest <= allowed, (loss, fast.largest)

    with LargestTensor() as naive:  # the detector does see the materialised s
        naive_aim_loss(t_attn.detach(), t_values.detach(), seg, s_attn, s_values, seg)
    assert naive.largest >= forbidden


# ------------------------------------------------------------------------------------- errors
def test_mismatched_segment_counts_are_named():
    t_attn, t_values, t_seg, s_attn, s_values, _ = tiny_case()
    with pytest.raises(ValueError, match="2 teacher segments but 1 student"):
        aim_loss(t_attn, t_values, t_seg, s_attn, s_values, torch.tensor([[0, 0, 0]]))


def test_gaps_in_segment_ids_are_rejected():
    t_attn, t_values, t_seg, s_attn, s_values, _ = tiny_case()
    with pytest.raises(ValueError, match="student segment ids of sequence 0 must be 0..S-1 without gaps"):
        aim_loss(t_attn, t_values, t_seg, s_attn, s_values, torch.tensor([[0, 0, 2]]))


def test_batch_without_segments_is_rejected():
    t_attn, t_values, _, s_attn, s_values, _ = tiny_case()
    none = torch.full((1, 3), -100)
    with pytest.raises(ValueError, match="no segments"):
        aim_loss(t_attn, t_values, none, s_attn, s_values, none)


@pytest.mark.parametrize("kwargs,match", [
    (dict(impl="aim_plus"), r"unknown AIM impl 'aim_plus'.*'aim', 'aim_star'"),
    (dict(loss="l1"), r"AIM loss='l1' is invalid: choose one of \['mse', 'cosine'\]"),
])
def test_unknown_impl_or_loss(kwargs, match):
    for fn in (aim_loss, naive_aim_loss):
        with pytest.raises(ValueError, match=match):
            fn(*tiny_case(), **kwargs)


def test_shape_errors():
    t_attn, t_values, t_seg, s_attn, s_values, s_seg = tiny_case()
    with pytest.raises(ValueError, match="teacher and student must share .* heads"):
        aim_loss(t_attn, t_values, t_seg, s_attn.expand(1, 2, 3, 3), s_values.expand(1, 2, 3, 2), s_seg)
    with pytest.raises(ValueError, match=r"student_attn must be \(B, H, L, L\)"):
        aim_loss(t_attn, t_values, t_seg, s_attn[..., :2], s_values, s_seg)
    with pytest.raises(ValueError, match="teacher_values must be"):
        aim_loss(t_attn, t_values[:, :, :2], t_seg, s_attn, s_values, s_seg)
    with pytest.raises(ValueError, match="student_seg must be"):
        aim_loss(t_attn, t_values, t_seg, s_attn, s_values, s_seg[:, :2])
    with pytest.raises(ValueError, match="integer segment ids"):
        aim_loss(t_attn, t_values, t_seg.float(), s_attn, s_values, s_seg)


# --------------------------------------------------------------------------------- pair subsets
def random_pairs(p: dict, impl: str, seed: int) -> torch.Tensor:
    """A random bool selection of (query, key) segment pairs (aim) or query segments (aim_star)."""
    n_segments = int(p["t_seg"].max()) + 1
    shape = (p["t_seg"].shape[0], n_segments) + ((n_segments,) if impl == "aim" else ())
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < 0.5


@pytest.mark.parametrize("impl,loss", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_pair_subset_matches_naive_and_splits_the_mean(impl, loss, seed):
    """The mean over a subset of pairs equals the literal definition on that subset, gradients
    too; the subset and its complement, weighted by their pair counts, give the full mean."""
    p = random_problem(seed, torch.float64)
    pairs = random_pairs(p, impl, seed)
    fast = call(aim_loss, p, impl=impl, loss=loss, pairs=pairs)
    naive = call(naive_aim_loss, p, impl=impl, loss=loss, pairs=pairs)
    torch.testing.assert_close(fast, naive, rtol=1e-10, atol=1e-12)
    for g_fast, g_naive in zip(torch.autograd.grad(fast, [p["s_attn"], p["s_kv"]]),
                               torch.autograd.grad(naive, [p["s_attn"], p["s_kv"]])):
        torch.testing.assert_close(g_fast, g_naive, rtol=1e-10, atol=1e-12)
    # decomposition: count the valid pairs on each side of the split
    from matt.objectives import pair_mask

    _, valid = segment_last_positions(p["t_seg"])
    full_mask = pair_mask(valid) if impl == "aim" else valid
    inside, outside = (full_mask & pairs).sum(), (full_mask & ~pairs).sum()
    rest = call(aim_loss, p, impl=impl, loss=loss, pairs=~pairs)
    whole = call(aim_loss, p, impl=impl, loss=loss)
    torch.testing.assert_close((fast * inside + rest * outside) / (inside + outside), whole.detach(),
                               rtol=1e-10, atol=1e-12)
    assert not torch.isclose(fast, rest)  # the subsets really differ


def test_empty_or_malformed_pair_subset():
    p = random_problem(0)
    pairs = random_pairs(p, "aim", 0)
    assert torch.isnan(call(aim_loss, p, pairs=torch.zeros_like(pairs)))
    with pytest.raises(ValueError, match="pairs must be a bool tensor of shape"):
        call(aim_loss, p, pairs=pairs[:, :1])
    with pytest.raises(ValueError, match="pairs must be a bool tensor"):
        call(aim_loss, p, pairs=pairs.float())
