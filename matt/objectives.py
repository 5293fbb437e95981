"""The AIM objective (Attention Influence Modeling): exact, in O(B·H·L²) extra memory.

Per side (teacher, student) we get attention probabilities ``A`` (B,H,L,L), value states ``V``
(B,H,L,D, KV heads already repeated to H) and segment ids ``seg`` (B,L): 0..S_b-1 in text order,
negative (-100) for tokens that belong to no segment (BOS, padding). Both sides tokenise the same
text, so L differs but B, H, D and every S_b agree. Segment i is queried at its last token t_i:

    aim       s[b,h,i,k] = Σ_{j: seg_j = k} A[b,h,t_i,j] · V[b,h,j]     for pairs k ≤ i
    aim_star  o[b,h,i]   = Σ_j A[b,h,t_i,j] · V[b,h,j]                  (the attention output at t_i)

``aim`` ignores segment-less tokens; ``aim_star`` keeps them, because the model really attends to
them (BOS is usually an attention sink) and o is the layer's actual output. Losses: ``mse`` is the
mean of (teacher − student)² over every (b,h,i,k≤i,d) — (b,h,i,d) for aim_star — and ``cosine`` the
mean of 1 − cos over the pairs (b,h,i,k≤i) — (b,h,i) for aim_star.

Why no (B,H,S,S,D) tensor is needed. Both losses only use three inner products per pair:
n = <s,s>, n' = <s',s'> and c = <s,s'> (mse sums n + n' − 2c; cosine is c / sqrt(n n')). Gather
each side's tokens by segment into slots: slot a of key segment k (row b) holds tok_x[b,k,a], the
a-th token of the segment (a < w, the key's width; later slots are empty). With

    q_x[b,h,i,k,a]    = A_x[b,h,t_i, tok_x[b,k,a]]                       (query weights by slot)
    U_x[b,h,k,a]      = V_x[b,h,tok_x[b,k,a]], 0 in empty slots           (… , w, D)
    G_xy[b,h,k,a',a]  = <U_y[b,h,k,a'], U_x[b,h,k,a]>                     (… , w, w): tiny

s[i,k] = Σ_a q[i,k,a] U[k,a], so c[i,k] = Σ_{a,a'} q[i,k,a] <U[k,a], U'[k,a']> q'[i,k,a']
= Σ_a' (G_ts[k] q[i,k])[a'] · q'[i,k,a'], and n, n' are the same with (G_tt, q, q) and (G_ss, q', q').
Empty slots have U = 0, so whatever q holds there drops out. Per key segment that is one small
matrix product (w×w)·(w×R) for all its query rows i ≥ k at once, then an elementwise
product and a sum over a. The widths are per key, not the batch's longest segment: keys are
grouped by width class, the power of two at or above the segment's token count on its longer side
(one width for both sides keeps the number of classes, and so of chunks, small). `_PairwiseAIM`
does the products batched over the heads and the (b, k) keys of a class, a few operators per
chunk, on token-major layouts (one row per token and head) from which a chunk's slots are whole
rows. Within a class, keys are chunked from the last segment backwards; a chunk whose first key
is k0 needs query rows k0..S−1 only (the causal triangle), and chunks are sized so that their
(H,n,w,R) query tensors stay within `CHUNK_ELEMENTS`. The hand-written backward recomputes them
chunk by chunk from the layouts. Cost: O(B·H·S²·w̄) memory traffic and O(B·H·S²·w̄²) arithmetic
for the mean width class w̄, against O(B·H·S²·D) for the literal s.

Exactness. n, n' and c go through the same operations on operands of the same shapes, so
identical teacher and student give bit-identical n = n' = c and a loss of exactly 0; with mse
the backward is arranged so that every gradient is then exactly 0 as well (see `_PairwiseAIM`).
The flip side of the Gram form is cancellation:
n + n' − 2c loses relative precision once the student is within ~1e-3 of the teacher (fp32), so
the computation always runs in float32 at least (autocast disabled), float64 if an input is.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.amp.autocast_mode import is_autocast_available

from matt.choices import AimImpl, Loss

AIM_IMPLS = (AimImpl.aim, AimImpl.aim_star)
"""The `AimImpl`s `aim_loss` computes (`hidden` is `hidden_state_loss`; `none` has no loss)."""
COSINE_EPS = 1e-6
"""Both vectors are extended by one constant coordinate ε before taking the cosine (see `_one_minus_cos`)."""


def segment_last_positions(seg: Tensor) -> tuple[Tensor, Tensor]:
    """Last token position of every segment: `(positions (B,S_max) long, valid (B,S_max) bool)`.

    S_max = largest segment id in the batch + 1. Slots of segments a row does not have are
    invalid and point at position 0 (safe to gather, must be masked).
    """
    if seg.ndim != 2:
        raise ValueError(f"segment ids must be (B, L), got shape {tuple(seg.shape)}")
    n_segments = max(int(seg.max()) + 1, 0) if seg.numel() else 0
    if n_segments == 0:
        empty = torch.zeros(seg.shape[0], 0, dtype=torch.long, device=seg.device)
        return empty, empty.bool()
    member = seg.unsqueeze(-1) == torch.arange(n_segments, device=seg.device)  # (B, L, S)
    pos = torch.arange(seg.shape[1], device=seg.device).view(1, -1, 1)
    last = torch.where(member, pos, -1).amax(dim=1)
    return last.clamp_min(0), last >= 0


def aim_loss(
    teacher_attn: Tensor, teacher_values: Tensor, teacher_seg: Tensor,
    student_attn: Tensor, student_values: Tensor, student_seg: Tensor,
    impl: str = "aim", loss: str = "mse", pairs: Tensor | None = None,
) -> Tensor:
    """AIM loss between teacher and student (scalar), never materialising per-pair vectors.

    Teacher tensors may be inference tensors; gradients flow to whatever requires them. `pairs`
    restricts the mean to a subset: (B, S, S) bool over (query segment i, key segment k) for `aim`,
    (B, S) over query segments for `aim_star` (S = the batch's segment count); NaN when it keeps
    no valid pair (a diagnostic, e.g. the pairs that involve new tokens: `matt.pipeline.probe`).
    """
    teacher, student = _prepare(teacher_attn, teacher_values, teacher_seg,
                                student_attn, student_values, student_seg, impl, loss)
    with _no_autocast(teacher_attn.device):
        if impl == "aim_star":
            return _vector_loss(teacher.queries() @ teacher.values, student.queries() @ student.values,
                                _restrict(teacher.valid, pairs), loss)
        mask = _restrict(pair_mask(teacher.valid), pairs)  # (B, S, S)
        total = _PairwiseAIM.apply(teacher.attn, teacher.values, student.attn, student.values,
                                   teacher.positions, student.positions, teacher.seg, student.seg, mask, loss)
        count = mask.sum() * teacher.values.shape[1]  # pairs × heads
        return total / (count * teacher.values.shape[-1] if loss == "mse" else count)


def naive_aim_loss(
    teacher_attn: Tensor, teacher_values: Tensor, teacher_seg: Tensor,
    student_attn: Tensor, student_values: Tensor, student_seg: Tensor,
    impl: str = "aim", loss: str = "mse", pairs: Tensor | None = None,
) -> Tensor:
    """Reference implementation: materialises every s (B,H,S,S,D) / o (B,H,S,D) literally."""
    teacher, student = _prepare(teacher_attn, teacher_values, teacher_seg,
                                student_attn, student_values, student_seg, impl, loss)
    with _no_autocast(teacher_attn.device):
        vec_t, vec_s = _naive_vectors(teacher, impl), _naive_vectors(student, impl)
        mask = _restrict(pair_mask(teacher.valid) if impl == "aim" else teacher.valid, pairs)
        return _vector_loss(vec_t, vec_s, mask, loss)


# ------------------------------------------------------------------------------------------------
@dataclass
class _Side:
    attn: Tensor  # (B, H, L, L), input dtype
    values: Tensor  # (B, H, L, D), compute dtype
    seg: Tensor  # (B, L)
    positions: Tensor  # (B, S) last token of each segment
    valid: Tensor  # (B, S) the row has this segment

    def queries(self) -> Tensor:
        """Attention rows of the segments' last tokens, (B, H, S, L), in the compute dtype."""
        b, h, length, _ = self.attn.shape
        index = self.positions[:, None, :, None].expand(b, h, -1, length)
        return self.attn.gather(2, index).to(self.values.dtype)

    def onehot(self) -> Tensor:
        """(B, 1, L, S): token j belongs to segment k."""
        ids = torch.arange(self.valid.shape[1], device=self.seg.device)
        return (self.seg.unsqueeze(-1) == ids).to(self.values.dtype).unsqueeze(1)


class _PairwiseAIM(torch.autograd.Function):
    """Σ over valid pairs (b,h,i,k) of the per-pair loss, with an explicit backward.

    Layout (see the module docstring): for a chunk of n key segments of one width class, q_x
    (H,n,w,R) holds the query weights of rows i = k0..S−1 on the keys' slots, G_xy = U_y U_xᵀ
    (H,n,w,w), y_xy = G_xy q_x on y's slots, and n_t = Σ_a y_tt·q_t, n_s = Σ_a y_ss·q_s,
    c = Σ_a y_ts·q_s. With a_* the partials of the per-pair loss f(n_t, n_s, c),
        ∂/∂q_s = 2·a_s·y_ss + a_c·y_ts                       (per slot and query row)
        ∂/∂U_s = P_ss U_s + P_st U_t,  P_ss = Σ_i q_s (2·a_s·q_s)ᵀ,  P_st = Σ_i q_s (a_c·q_t)ᵀ
    (symmetrically for the teacher, with y_st = G_st q_s and G_st = U_t U_sᵀ computed on its own
    rather than transposed). For mse a_c = −2·a_s exactly, and both terms of every sum go through
    the same operations on operands of the same shapes, so bit-identical teacher and student give
    gradients of exactly zero, not rounding noise that Adam would blow up into steps of size lr.
    Between forward and backward only the token-major layouts and the chunk plan are kept: the
    backward recomputes q, U and y chunk by chunk; each key segment lies in one chunk, so its P
    matrices are complete there.
    """

    @staticmethod
    def forward(ctx, t_attn, tv, s_attn, sv, t_pos, s_pos, t_seg, s_seg, mask, loss):  # noqa: D401
        ctx.save_for_backward(t_attn, s_attn)
        t, s = _TokenMajor.of(t_attn, tv, t_pos), _TokenMajor.of(s_attn, sv, s_pos)
        chunks = _key_chunks(t_seg, s_seg, mask, tv.shape[1])
        # the token-major layouts (half the attention's size per side: what AIM*'s own gather keeps
        # for backward) and the chunk plan are kept; the chunks' terms are recomputed
        ctx.loss, ctx.layouts, ctx.chunks = loss, (t, s), chunks
        total = tv.new_zeros(())
        for chunk in chunks:
            terms = _PairTerms.compute(chunk, t, s, with_st=False)
            total = total + _pair_losses(terms, chunk.mask, loss).sum()
        return total

    @staticmethod
    def backward(ctx, grad_total):
        t_attn, s_attn = ctx.saved_tensors
        need_t = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        need_s = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        t, s = ctx.layouts
        sides = {name: side for name, side, needed in (("t", t, need_t), ("s", s, need_s)) if needed}
        # gradients in the token-major layouts: d/dq (H, tokens, S) and d/dU (H, tokens, D)
        grad_q = {name: torch.zeros_like(side.queries) for name, side in sides.items()}
        grad_u = {name: torch.zeros_like(side.values) for name, side in sides.items()}
        for chunk in ctx.chunks:
            terms = _PairTerms.compute(chunk, t, s, with_st=need_t)
            a_t, a_s, a_c = (a.unsqueeze(-2) * grad_total for a in _pair_partials(terms, chunk.mask, ctx.loss))
            for name in sides:
                # own side's slots, q, U and y, the other side's q and U, y of the cross term, ∂f/∂n_own
                rows, q, u, y_own, q_other, u_other, y_cross, a_own = (
                    (chunk.s_rows, terms.q_s, terms.u_s, terms.y_ss, terms.q_t, terms.u_t, terms.y_ts, a_s)
                    if name == "s" else
                    (chunk.t_rows, terms.q_t, terms.u_t, terms.y_tt, terms.q_s, terms.u_s,
                     _slot_mm(terms.g_st, terms.q_s), a_t))
                dq = 2 * a_own * y_own + a_c * y_cross  # (H, n, w, R)
                grad_q[name][..., chunk.first_row:].flatten(0, 1).index_add_(0, rows, dq.flatten(0, 2))
                du = _slot_mm(q @ (2 * a_own * q).mT, u).add_(_slot_mm(q @ (a_c * q_other).mT, u_other))  # (H,n,w,D)
                grad_u[name].flatten(0, 1).index_add_(0, rows, du.flatten(0, 2))
        grads = {}
        for name, side in sides.items():
            grads[f"{name}_attn"] = side.attention_grad(grad_q[name], t_attn if name == "t" else s_attn)
            grads[f"{name}v"] = side.values_grad(grad_u[name])
        return (*(grads.get(name) for name in ("t_attn", "tv", "s_attn", "sv")), *([None] * 6))


CHUNK_ELEMENTS = 2**19
"""Full AIM walks over the key segments in chunks whose (H, n, w, R) query tensors hold at most
about this many elements (2 MB in float32; at least one key per chunk), so memory stays bounded by
a few such tensors whatever the sequence length; the working set of a chunk then stays in cache."""


@dataclass
class _TokenMajor:
    """One side's attention rows at the segment ends and its values, one row per token and head
    (head-major, so that a chunk's gathered slots are contiguous batches for the matmuls), plus a zero
    row that empty slots point at (they gather zeros and their gradients land nowhere)."""

    queries: Tensor  # (H, B·L + 1, S): queries[h, b·L + j, i] = A[b, h, t_i, j]
    values: Tensor  # (H, B·L + 1, D): values[h, b·L + j] = V[b, h, j]
    positions: Tensor  # (B, S) t_i

    @classmethod
    def of(cls, attn: Tensor, values: Tensor, positions: Tensor) -> "_TokenMajor":
        b, h, length, d = values.shape
        queries = values.new_empty(h, b * length + 1, positions.shape[1])
        queries[:, -1].zero_()
        index = positions[None, :, None, :].expand(h, b, length, -1)
        columns, layout = attn.permute(1, 0, 3, 2), queries[:, :-1].view(h, b, length, -1)
        if columns.dtype == layout.dtype:  # one pass: A read along its columns straight into the layout
            torch.gather(columns, 3, index, out=layout)
        else:  # (bf16 attention, float32 compute) cast the gathered entries only
            layout.copy_(columns.gather(3, index))
        token_values = values.new_empty(h, b * length + 1, d)
        token_values[:, -1].zero_()
        token_values[:, :-1].view(h, b, length, d).copy_(values.transpose(0, 1))
        return cls(queries, token_values, positions)

    def attention_grad(self, grad_queries: Tensor, attn: Tensor) -> Tensor:
        """d/dA (B, H, L, L) from d/dqueries: only the rows t_i of the attention get a gradient."""
        b, h, length, _ = attn.shape
        rows = grad_queries[:, :-1].view(h, b, length, -1).permute(1, 0, 3, 2).contiguous()  # (B, H, S, L)
        grad = torch.zeros(attn.shape, dtype=rows.dtype, device=rows.device)
        for i in range(b):  # whole rows; segments a sequence lacks point at row 0 with zero gradient
            grad[i].index_add_(1, self.positions[i], rows[i])
        return grad.to(attn.dtype)

    def values_grad(self, grad_values: Tensor) -> Tensor:
        """d/dV (B, H, L, D) from d/dvalues."""
        h, _, d = grad_values.shape
        return grad_values[:, :-1].view(h, len(self.positions), -1, d).transpose(0, 1)


@dataclass
class _KeyChunk:
    """n key segments (b, k) of one width class, and the query rows k0..S−1 (k0 = their smallest k)."""

    t_rows: Tensor  # (H·n·w,) row h·T + j of the (H·T, F) token-major layouts per head and teacher slot
    s_rows: Tensor  # (H·n·w,) the same for the student (j = the zero row for empty slots)
    size: int  # n
    width: int  # w
    first_row: int  # k0
    mask: Tensor  # (1, n, R) query row k0 + r pairs with the key


def _key_chunks(t_seg: Tensor, s_seg: Tensor, mask: Tensor, heads: int) -> list[_KeyChunk]:
    """The key segments that take part in a pair, grouped by width class (the power of two at or
    above the segment's token count on the longer side) and, within a class, chunked from the last
    segment backwards so that each chunk's query tensors stay within `CHUNK_ELEMENTS`."""
    n_segments = mask.shape[1]
    t_counts, s_counts = _token_counts(t_seg, n_segments), _token_counts(s_seg, n_segments)
    widest = _width_class(int(torch.maximum(t_counts, s_counts).max())) if n_segments else 1
    t_slots, s_slots = _slots(t_seg, t_counts, widest), _slots(s_seg, s_counts, widest)
    t_counts, s_counts, used = torch.stack([t_counts, s_counts, mask.any(1).long()]).tolist()  # one host sync
    classes: dict[int, list[tuple[int, int]]] = {}
    for b, (row_t, row_s, row_used) in enumerate(zip(t_counts, s_counts, used)):
        for k in range(n_segments):
            if row_used[k]:
                classes.setdefault(_width_class(max(row_t[k], row_s[k])), []).append((k, b))
    head_offsets = torch.arange(heads, device=mask.device)[:, None]

    def by_head(tokens: Tensor, n_tokens: int) -> Tensor:
        return (head_offsets * n_tokens + tokens.flatten()).flatten()

    chunks = []
    for width, keys in classes.items():
        keys.sort(reverse=True)
        start = 0
        for end in range(1, len(keys) + 1):
            if end == len(keys) or (end + 1 - start) * heads * 2 * width * (n_segments - keys[end][0]) > CHUNK_ELEMENTS:
                k_index = torch.tensor([k for k, _ in keys[start:end]], device=mask.device)
                b_index = torch.tensor([b for _, b in keys[start:end]], device=mask.device)
                first = keys[end - 1][0]
                chunks.append(_KeyChunk(t_rows=by_head(t_slots[b_index, k_index, :width], t_seg.numel() + 1),
                                        s_rows=by_head(s_slots[b_index, k_index, :width], s_seg.numel() + 1),
                                        size=end - start, width=width, first_row=first,
                                        mask=mask[b_index, first:, k_index].unsqueeze(0)))
                start = end
    return chunks


def _width_class(count: int) -> int:
    return 1 << max(count - 1, 0).bit_length()


def _token_counts(seg: Tensor, n_segments: int) -> Tensor:
    """(B, S) tokens per segment."""
    counts = torch.zeros(seg.shape[0], n_segments + 1, dtype=torch.long, device=seg.device)
    counts.scatter_add_(1, torch.where(seg >= 0, seg, n_segments), torch.ones_like(seg, dtype=torch.long))
    return counts[:, :n_segments]


def _slots(seg: Tensor, counts: Tensor, width: int) -> Tensor:
    """(B, S, width) token-major rows of each segment's tokens in order; the zero row B·L past a
    segment's end."""
    batch, length = seg.shape
    n_segments = counts.shape[1]
    member = seg >= 0
    key = torch.where(member, seg, n_segments)  # tokens without a segment sort last
    order = key.argsort(dim=1, stable=True)
    start = torch.cat([counts.cumsum(1) - counts, counts.sum(1, keepdim=True)], 1)  # first token of each
    positions = torch.arange(length, device=seg.device).expand(batch, -1)
    rank = torch.empty_like(order).scatter_(1, order, positions - start.gather(1, key.gather(1, order)))
    slot = torch.where(member, key * width + rank, n_segments * width)  # one spare slot for the rest
    rows = torch.full((batch, n_segments * width + 1), batch * length, dtype=torch.long, device=seg.device)
    flat = positions + torch.arange(batch, device=seg.device)[:, None] * length
    rows.scatter_(1, slot, torch.where(member, flat, batch * length))
    return rows[:, :-1].view(batch, n_segments, width)


@dataclass
class _PairTerms:
    """One chunk's q (H, n, w, R) and U (H, n, w, D) per side, the Gram blocks G_xy = U_y U_xᵀ
    (H, n, w, w), the products y = G q on each side's slots, and n_t, n_s, c per pair (H, n, R)."""

    q_t: Tensor
    q_s: Tensor
    u_t: Tensor
    u_s: Tensor
    g_st: Tensor | None
    y_tt: Tensor
    y_ss: Tensor
    y_ts: Tensor
    n_t: Tensor
    n_s: Tensor
    c: Tensor

    @classmethod
    def compute(cls, chunk: _KeyChunk, t: _TokenMajor, s: _TokenMajor, *, with_st: bool) -> "_PairTerms":
        def by_slot(x: Tensor, rows: Tensor) -> Tensor:  # (H, T, F) -> (H, n, w, F)
            # whole rows of the (H·T, F) view: much faster than selecting along dim 1
            return x.flatten(0, 1).index_select(0, rows).view(x.shape[0], chunk.size, chunk.width, x.shape[-1])

        q_t = by_slot(t.queries[..., chunk.first_row:], chunk.t_rows)
        q_s = by_slot(s.queries[..., chunk.first_row:], chunk.s_rows)
        u_t, u_s = by_slot(t.values, chunk.t_rows), by_slot(s.values, chunk.s_rows)
        y_tt, y_ss, y_ts = _slot_mm(u_t @ u_t.mT, q_t), _slot_mm(u_s @ u_s.mT, q_s), _slot_mm(u_s @ u_t.mT, q_t)
        return cls(q_t=q_t, q_s=q_s, u_t=u_t, u_s=u_s, g_st=u_t @ u_s.mT if with_st else None,
                   y_tt=y_tt, y_ss=y_ss, y_ts=y_ts,
                   n_t=(y_tt * q_t).sum(-2), n_s=(y_ss * q_s).sum(-2), c=(y_ts * q_s).sum(-2))


def _slot_mm(a: Tensor, b: Tensor) -> Tensor:
    """a @ b over a chunk's slots; width-1 chunks (one token per segment, most keys in practice) as a
    broadcast product, which is the same single multiplication per entry and ~30x faster on CPU than
    a batched matmul with an inner dimension of 1."""
    return a * b if a.shape[-1] == 1 else a @ b


def _pair_losses(terms: _PairTerms, mask: Tensor, loss: str) -> Tensor:
    """Per-pair loss (h, S, S), zero outside `mask`."""
    if loss == "mse":
        # ||s - s'||² >= 0; the Gram form can round to a tiny negative number near identity
        value = (terms.n_t + terms.n_s - 2 * terms.c).clamp_min(0.0)
    else:
        value = _one_minus_cos(terms.c, terms.n_t, terms.n_s)
    return torch.where(mask, value, 0.0)


def _pair_partials(terms: _PairTerms, mask: Tensor, loss: str) -> tuple[Tensor, Tensor, Tensor]:
    """∂f/∂n_t, ∂f/∂n_s, ∂f/∂c per pair, zero outside `mask` (and where the clamp is active)."""
    if loss == "mse":
        active = mask & (terms.n_t + terms.n_s - 2 * terms.c >= 0)
        one = active.to(terms.c.dtype)
        return one, one, -2 * one
    e = COSINE_EPS**2
    den = torch.sqrt((terms.n_t + e) * (terms.n_s + e))
    cos = (terms.c + e) / den
    active = (mask & (cos <= 1)).to(terms.c.dtype)
    return (active * cos / (2 * (terms.n_t + e)), active * cos / (2 * (terms.n_s + e)), -active / den)


def _naive_vectors(side: _Side, impl: str) -> Tensor:
    """s (B,H,S,S,D) for aim, o (B,H,S,D) for aim_star, straight from the definitions."""
    attn = side.attn.to(side.values.dtype)
    if impl == "aim_star":
        out = attn @ side.values  # the full attention output (B, H, L, D)
        return torch.stack([out[b][:, side.positions[b]] for b in range(out.shape[0])])
    rows = torch.stack([attn[b][:, side.positions[b]] for b in range(attn.shape[0])])  # (B,H,S,L)
    weighted = rows.unsqueeze(-1) * side.values.unsqueeze(2)  # A[t_i, j] V_j: (B, H, S, L, D)
    return torch.einsum("bhijd,bjk->bhikd", weighted, side.onehot().squeeze(1))


def _vector_loss(vec_t: Tensor, vec_s: Tensor, mask: Tensor, loss: str) -> Tensor:
    """Loss between explicit vectors (..., D); `mask` (B, S[, S]) marks the pairs that count."""
    mask = mask.unsqueeze(1).expand(vec_t.shape[:-1])  # over heads
    if loss == "mse":
        sq = ((vec_t - vec_s) ** 2).sum(-1)
        return torch.where(mask, sq, 0.0).sum() / (mask.sum() * vec_t.shape[-1])
    cos = _one_minus_cos((vec_t * vec_s).sum(-1), (vec_t * vec_t).sum(-1), (vec_s * vec_s).sum(-1))
    return torch.where(mask, cos, 0.0).sum() / mask.sum()


def _one_minus_cos(dot: Tensor, n_x: Tensor, n_y: Tensor) -> Tensor:
    """1 − cos(x, y) from <x,y>, |x|², |y|², with both vectors extended by a coordinate ε.

    This keeps the loss smooth and defined everywhere: two zero vectors count as identical (0),
    a zero vector against a non-zero one costs ≈ 1, and for ordinary vectors the ε² = 1e-12 shift is
    far below fp32 resolution. Identical inputs give exactly 0 since sqrt(fl(x·x)) = x in IEEE
    arithmetic.
    """
    e = COSINE_EPS**2
    return (1 - (dot + e) / torch.sqrt((n_x + e) * (n_y + e))).clamp_min(0.0)  # rounding can overshoot cos = 1


def pair_mask(valid: Tensor) -> Tensor:
    """(B, S, S): query segment i and key segment k both exist and k ≤ i (the pairs AIM averages over;
    `valid` (B, S) from `segment_last_positions`)."""
    causal = torch.ones(valid.shape[1], valid.shape[1], dtype=torch.bool, device=valid.device).tril()
    return valid.unsqueeze(2) & valid.unsqueeze(1) & causal


def _restrict(mask: Tensor, pairs: Tensor | None) -> Tensor:
    """`mask` & `pairs` (the caller's subset of pairs / query segments), shapes checked."""
    if pairs is None:
        return mask
    if tuple(pairs.shape) != tuple(mask.shape) or pairs.dtype != torch.bool:
        raise ValueError(f"pairs must be a bool tensor of shape {tuple(mask.shape)} (batch, segments"
                         f"{', segments' if mask.ndim == 3 else ''}), got {pairs.dtype} {tuple(pairs.shape)}")
    return mask & pairs.to(mask.device)


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """The Gram form needs full precision: autocast would run its matmuls in bf16."""
    if is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _prepare(t_attn: Tensor, t_values: Tensor, t_seg: Tensor, s_attn: Tensor, s_values: Tensor,
             s_seg: Tensor, impl: str, loss: str) -> tuple[_Side, _Side]:
    """Validate the inputs (clear errors instead of shape crashes) and build both sides."""
    if impl not in AIM_IMPLS:
        raise ValueError(f"unknown AIM impl {impl!r}; choose one of {[str(i) for i in AIM_IMPLS]}")
    Loss.parse(loss, "AIM loss")
    dtype = functools.reduce(torch.promote_types, [t_attn.dtype, t_values.dtype, s_attn.dtype,
                                                   s_values.dtype], torch.float32)
    teacher = _side("teacher", t_attn, t_values, t_seg, dtype)
    student = _side("student", s_attn, s_values, s_seg, dtype)
    (b_t, h_t, _, d_t), (b_s, h_s, _, d_s) = teacher.values.shape, student.values.shape
    if (b_t, h_t, d_t) != (b_s, h_s, d_s):
        raise ValueError(f"teacher and student must share batch size, heads and head dim: teacher "
                         f"(B={b_t}, H={h_t}, D={d_t}) vs student (B={b_s}, H={h_s}, D={d_s})")

    # one host sync for all segment-count checks
    counts = torch.stack([teacher.valid.sum(1), _n_ids(teacher.seg), student.valid.sum(1),
                          _n_ids(student.seg)]).tolist()
    for b, (n_t, ids_t, n_s, ids_s) in enumerate(zip(*counts)):
        for name, n, ids in (("teacher", n_t, ids_t), ("student", n_s, ids_s)):
            if n != ids:
                raise ValueError(f"{name} segment ids of sequence {b} must be 0..S-1 without gaps; "
                                 f"ids go up to {ids - 1} but only {n} segments have tokens")
        if n_t != n_s:
            raise ValueError(f"sequence {b} has {n_t} teacher segments but {n_s} student segments; "
                             "both tokenisations must split the text into the same segments")
    if sum(counts[0]) == 0:
        raise ValueError("no segments in the batch: every segment id is negative")
    return teacher, student


def _n_ids(seg: Tensor) -> Tensor:
    """Per row: largest segment id + 1 (0 for a row without segments)."""
    return seg.amax(1).clamp_min(-1) + 1


def _side(name: str, attn: Tensor, values: Tensor, seg: Tensor, dtype: torch.dtype) -> _Side:
    if attn.ndim != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"{name}_attn must be (B, H, L, L), got {tuple(attn.shape)}")
    b, h, length, _ = attn.shape
    if values.ndim != 4 or tuple(values.shape[:3]) != (b, h, length):
        raise ValueError(f"{name}_values must be (B={b}, H={h}, L={length}, D) like {name}_attn, "
                         f"got {tuple(values.shape)}")
    if tuple(seg.shape) != (b, length):
        raise ValueError(f"{name}_seg must be (B={b}, L={length}), got {tuple(seg.shape)}")
    if seg.dtype.is_floating_point or seg.dtype == torch.bool:
        raise ValueError(f"{name}_seg must hold integer segment ids, got {seg.dtype}")
    seg = seg.to(attn.device)
    values = values.to(dtype)
    # inference tensors (a teacher run under torch.inference_mode) cannot be saved for backward
    if values.is_inference():
        values = values.clone()
    if attn.is_inference():
        attn = attn.clone()
    positions, valid = segment_last_positions(seg)
    return _Side(attn, values, seg, positions, valid)


# ------------------------------------------------------------------------------------------------
# Hidden-state distillation at segment ends (the baseline objective of "Token Distillation",
# Dobler et al., arXiv:2505.20133, at the AIM layer)
# ------------------------------------------------------------------------------------------------
def hidden_state_loss(
    teacher_hidden: Tensor, teacher_seg: Tensor, student_hidden: Tensor, student_seg: Tensor, loss: str = "mse",
) -> Tensor:
    """Distance between the residual streams of teacher and student at the last token of every segment.

    `*_hidden` (B, L, D): the output of the AIM decoder layer on each side (L differs, B and D agree);
    `*_seg` (B, L) segment ids as for `aim_loss`. With h_i and h'_i the teacher's and the student's
    vectors at segment i's last token: `mse` = mean over (b, i, d) of (h − h')², `cosine` = mean over
    (b, i) of 1 − cos(h, h'). Computed in float32 at least (autocast off)."""
    Loss.parse(loss, "hidden-state loss")
    dtype = functools.reduce(torch.promote_types, [teacher_hidden.dtype, student_hidden.dtype], torch.float32)
    for name, hidden, seg in (("teacher", teacher_hidden, teacher_seg), ("student", student_hidden, student_seg)):
        if hidden.ndim != 3:
            raise ValueError(f"{name}_hidden must be (B, L, D), got {tuple(hidden.shape)}")
        if tuple(seg.shape) != tuple(hidden.shape[:2]):
            raise ValueError(f"{name}_seg must be (B={hidden.shape[0]}, L={hidden.shape[1]}), got {tuple(seg.shape)}")
        if seg.dtype.is_floating_point or seg.dtype == torch.bool:
            raise ValueError(f"{name}_seg must hold integer segment ids, got {seg.dtype}")
    if teacher_hidden.shape[0] != student_hidden.shape[0] or teacher_hidden.shape[2] != student_hidden.shape[2]:
        raise ValueError(f"teacher and student hidden states must share batch size and width: "
                         f"{tuple(teacher_hidden.shape)} vs {tuple(student_hidden.shape)}")
    t_pos, t_valid = segment_last_positions(teacher_seg.to(teacher_hidden.device))
    s_pos, s_valid = segment_last_positions(student_seg.to(student_hidden.device))
    if t_valid.shape != s_valid.shape or not torch.equal(t_valid, s_valid.to(t_valid.device)):
        raise ValueError("teacher and student must split every sequence into the same segments "
                         f"(segments per row: teacher {t_valid.sum(1).tolist()}, student {s_valid.sum(1).tolist()})")
    if not bool(t_valid.any()):
        raise ValueError("no segments in the batch: every segment id is negative")
    with _no_autocast(student_hidden.device):
        width = teacher_hidden.shape[2]
        teacher_hidden = teacher_hidden.clone() if teacher_hidden.is_inference() else teacher_hidden
        t = teacher_hidden.to(dtype).gather(1, t_pos.unsqueeze(-1).expand(-1, -1, width))  # (B, S, D)
        s = student_hidden.to(dtype).gather(1, s_pos.to(student_hidden.device).unsqueeze(-1).expand(-1, -1, width))
        t = t.to(s.device)
        valid = t_valid.to(s.device)
        if loss == "mse":
            per_segment = ((t - s) ** 2).sum(-1)
            return torch.where(valid, per_segment, 0.0).sum() / (valid.sum() * width)
        per_segment = _one_minus_cos((t * s).sum(-1), (t * t).sum(-1), (s * s).sum(-1))
        return torch.where(valid, per_segment, 0.0).sum() / valid.sum()
