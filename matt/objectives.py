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
n = <s,s>, n' = <s',s'> and c = <s,s'> (mse sums n + n' − 2c; cosine is c / sqrt(n n')). With
q = A[t_i, :] the gathered query row of the teacher and q' the student's,

    c[i,k] = Σ_{j: seg_j=k} Σ_{j': seg'_j'=k} q_j q'_j' <V_j, V'_j'>
           = Σ_{j': seg'_j'=k} (q · C)[j'] · q'_j'   with  C[j,j'] = <V_j, V'_j'> · [seg_j = seg'_j']

because the same-segment mask in C already restricts j to segment k once j' is in it; n and n'
are the same expression with (V,V) and (V',V'). Segments are runs of consecutive tokens, so C is
block diagonal with blocks of at most w tokens (the longest segment): `_PairwiseAIM` computes
(q · C) in that banded form, O(S·L·w) per head instead of the O(S·L²) of a dense masked matrix,
walks over a few heads at a time in its forward and its hand-written backward, and keeps nothing
between them but the inputs. Full AIM therefore needs about as much memory as AIM* (`make bench`).

Exactness. n, n' and c go through the same function, so identical teacher and student give
bit-identical n = n' = c and a loss of exactly 0; with mse the backward is arranged so that every
gradient is then exactly 0 as well (see `_PairwiseAIM`). The flip side of the Gram form is cancellation:
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

    Segments are runs of consecutive tokens, so the same-segment Gram matrices are block diagonal
    with blocks of at most w tokens (the longest segment). Everything is computed in that banded
    form: for token j of one side, only the ≤ w tokens of its segment on the other side are
    visited, which costs O(S·L·w) instead of the O(S·L²) of dense masked matrices. The loop runs
    over chunks of (b, h) heads and nothing but the inputs is kept between forward and backward
    (the backward recomputes), so the temporaries (a few (h, S, L) tensors) stay a fraction of
    the attention tensors themselves.

    Per pair the loss is f(n_t, n_s, c) with n_t = <s,s>, n_s = <s',s'>, c = <s,s'>. With a_* the
    partials of f per pair and x_xy[i, j] = Σ_{j''∈seg(j)} q_x[i,j''] <V_x[j''], V_y[j]>,
        ∂/∂q'_j'  = 2·a_s·x_ss[j'] + a_c·x_ts[j']
        ∂/∂V'_j'  = Σ_i [2·a_s q'_j' Σ_{j''∈k} q'_j'' V'_j'' + a_c q'_j' Σ_{j∈k} q_j V_j]
    (symmetrically for the teacher). For mse a_c = −2·a_s exactly, and both terms of every sum run
    through the same code on the same layout, so bit-identical teacher and student give gradients
    of exactly zero, not rounding noise that Adam would blow up into steps of size lr.
    """

    @staticmethod
    def forward(ctx, t_attn, tv, s_attn, sv, t_pos, s_pos, t_seg, s_seg, mask, loss):  # noqa: D401
        ctx.save_for_backward(t_attn, tv, s_attn, sv, t_pos, s_pos, t_seg, s_seg, mask)
        ctx.loss = loss
        total = tv.new_zeros(())
        for layout, heads, rows in _chunks(t_pos, s_pos, t_seg, s_seg, tv.shape[1]):
            b = layout.batch
            tq = _query_rows(t_attn, b, heads, t_pos[b, rows], tv.dtype)
            sq = _query_rows(s_attn, b, heads, s_pos[b, rows], tv.dtype)
            terms = _PairTerms.compute(layout, tq, tv[b, heads], sq, sv[b, heads])
            total = total + _pair_losses(terms, mask[b, rows], loss).sum()
        return total

    @staticmethod
    def backward(ctx, grad_total):
        t_attn, tv, s_attn, sv, t_pos, s_pos, t_seg, s_seg, mask = ctx.saved_tensors
        need_t = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        need_s = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        # Only the query rows of the attention get a gradient; it is written straight into these
        # (B, H, L, L) buffers, so no (B, H, S, L) query tensor or its gradient is ever stored.
        grads = {name: torch.zeros(x.shape, dtype=tv.dtype, device=x.device) if needed else None
                 for name, x, needed in (("t_attn", t_attn, need_t), ("tv", tv, need_t),
                                         ("s_attn", s_attn, need_s), ("sv", sv, need_s))}
        for layout, heads, rows in _chunks(t_pos, s_pos, t_seg, s_seg, tv.shape[1]):
            b = layout.batch
            tq = _query_rows(t_attn, b, heads, t_pos[b, rows], tv.dtype)
            sq = _query_rows(s_attn, b, heads, s_pos[b, rows], tv.dtype)
            t_values, s_values = tv[b, heads], sv[b, heads]
            terms = _PairTerms.compute(layout, tq, t_values, sq, s_values, with_x_st=need_t)
            a_t, a_s, a_c = (a * grad_total for a in _pair_partials(terms, mask[b, rows], ctx.loss))
            sides = []
            if need_s:  # (own side, other side, band own-own, band other-own, partials, x own/own, x other/own)
                sides.append(("s", s_pos, sq, s_values, tq, t_values, layout.ss, layout.ts, layout.s_seg,
                              a_s, terms.x_ss, terms.x_ts))
            if need_t:
                sides.append(("t", t_pos, tq, t_values, sq, s_values, layout.tt, layout.st, layout.t_seg,
                              a_t, terms.x_tt, terms.x_st))
            for name, pos, q, values, q_other, values_other, own_band, other_band, seg, a_own, x_own, x_other in sides:
                coef = _per_token(2 * a_own, seg)  # weight of (i, token j) through <s_own, s_own>
                cross = _per_token(a_c, seg)  # ... and through the cross term c
                grads[f"{name}_attn"][b, heads].index_add_(1, pos[b, rows],
                                                            (coef * x_own + cross * x_other).transpose(1, 2))
                own = _band_combine(_band_pair_weights(coef * q, q, own_band), values, own_band)
                other = _band_combine(_band_pair_weights(cross * q, q_other, other_band), values_other, other_band)
                grads["tv" if name == "t" else "sv"][b, heads] += own + other
        for name, x in (("t_attn", t_attn), ("s_attn", s_attn)):
            if grads[name] is not None:
                grads[name] = grads[name].to(x.dtype)
        return grads["t_attn"], grads["tv"], grads["s_attn"], grads["sv"], *([None] * 6)


MAX_CHUNKS = 16
"""Full AIM processes its B·H·S (head, query segment) rows in about this many chunks: the
temporaries of one chunk (a few (h, L, rows) tensors) then stay a small fraction of the attention
tensors, and the loop stays short enough for a GPU (each chunk dispatches ~300 operators, forward
and backward; measured at L=512, batch 1, SmolLM2's heads: 32 chunks 13 MB extra / 8.8K operators,
16 chunks 15 MB / 4.5K)."""


@dataclass
class _Band:
    """For each token j of side y: the (≤ w) positions of side x in the segment of j."""

    index: Tensor  # (L_y, w) long, clamped to valid positions
    valid: Tensor  # (L_y, w) float 1/0: that position exists and belongs to j's segment


@dataclass
class _Segments:
    """Segment ids of one sequence's tokens, in the two forms the per-token products index with."""

    index: Tensor  # (L,) segment of each token, 0 for tokens without one
    member: Tensor  # (L, 1) bool: the token belongs to a segment

    @classmethod
    def of(cls, seg: Tensor) -> "_Segments":
        return cls(seg.clamp_min(0), (seg >= 0).unsqueeze(-1))


@dataclass
class _Layout:
    """The segment structure of one sequence on both sides (shared by all its heads)."""

    batch: int
    t_seg: _Segments
    s_seg: _Segments
    tt: _Band  # teacher rows for teacher tokens
    ss: _Band  # student rows for student tokens
    ts: _Band  # teacher rows for student tokens
    st: _Band  # student rows for teacher tokens
    n_segments: int


def _chunks(t_pos: Tensor, s_pos: Tensor, t_seg: Tensor, s_seg: Tensor, heads: int):
    """(layout of sequence b, slice of heads, slice of query segments): about `MAX_CHUNKS` in all.

    Query rows are independent (every per-pair term belongs to one query segment i; the value
    gradients are sums over i), so a chunk can hold a few heads or part of one head's rows."""
    batch, n_segments = t_pos.shape
    per_chunk = max(1, -(-batch * heads * n_segments // MAX_CHUNKS),  # (head, row) pairs
                    MIN_CHUNK_ELEMENTS // max(t_seg.shape[1], s_seg.shape[1], 1))
    head_step = max(1, min(heads, per_chunk // max(n_segments, 1)))
    row_step = max(1, min(n_segments, per_chunk))
    for b in range(batch):
        t_first, t_span = _segment_spans(t_seg[b], t_pos[b], n_segments)
        s_first, s_span = _segment_spans(s_seg[b], s_pos[b], n_segments)
        layout = _Layout(
            batch=b, t_seg=_Segments.of(t_seg[b]), s_seg=_Segments.of(s_seg[b]), n_segments=n_segments,
            tt=_band(t_seg[b], t_first, t_span, t_seg[b]), ss=_band(s_seg[b], s_first, s_span, s_seg[b]),
            ts=_band(t_seg[b], t_first, t_span, s_seg[b]), st=_band(s_seg[b], s_first, s_span, t_seg[b]),
        )
        for h in range(0, heads, head_step):
            for r in range(0, n_segments, row_step):
                yield layout, slice(h, min(h + head_step, heads)), slice(r, min(r + row_step, n_segments))


def _segment_spans(seg: Tensor, last: Tensor, n_segments: int) -> tuple[Tensor, Tensor]:
    """First position and span (last − first + 1; 0 for absent segments) of every segment."""
    length = seg.shape[0]
    positions = torch.arange(length, device=seg.device)
    member = seg >= 0
    first = torch.full((n_segments,), length, dtype=torch.long, device=seg.device)
    first = first.scatter_reduce(0, seg[member], positions[member], reduce="amin")
    present = first < length
    span = torch.where(present, last - first + 1, 0)
    return first.clamp(max=max(length - 1, 0)), span


def _band(seg_x: Tensor, first_x: Tensor, span_x: Tensor, seg_y: Tensor) -> _Band:
    width = max(int(span_x.max()), 1) if span_x.numel() else 1
    k = seg_y.clamp_min(0)
    offsets = torch.arange(width, device=seg_y.device)
    index = (first_x[k].unsqueeze(1) + offsets).clamp(max=seg_x.shape[0] - 1)  # (L_y, w)
    valid = (seg_y >= 0).unsqueeze(1) & (offsets < span_x[k].unsqueeze(1)) & (seg_x[index] == seg_y.unsqueeze(1))
    return _Band(index, valid)


def _query_rows(attn: Tensor, b: int, heads: slice, positions: Tensor, dtype: torch.dtype) -> Tensor:
    """The attention rows of the segments' last tokens for these heads, token-major: (h, L, S).

    Token-major so that gathering the tokens of a segment (the inner loop of every banded
    product) copies contiguous rows."""
    return attn[b, heads].index_select(1, positions).to(dtype).transpose(1, 2).contiguous()


MIN_CHUNK_ELEMENTS = 2**16
"""... but a chunk holds at least this many (row, token) entries: short sequences take one chunk."""

BAND_GROUP_ELEMENTS = 2**19
"""The banded products gather the band's tokens for several offsets r at once: as many as keep one
gathered (h, L, offsets, D or S) tensor within this many elements (2 MB in float32), so a typical
band is a few gathers and reductions instead of three small operations per offset."""


def _offset_groups(band: _Band, per_offset: int):
    """Slices of band offsets r whose gathered tensors stay within `BAND_GROUP_ELEMENTS`."""
    width = band.index.shape[1]
    step = max(1, min(width, BAND_GROUP_ELEMENTS // max(per_offset, 1)))
    return [slice(r, min(r + step, width)) for r in range(0, width, step)]


def _gather_band(x: Tensor, band: _Band, offsets: slice) -> Tensor:
    """(h, L_y, r, ...) rows x[h, index[j, r]] for the offsets r in `offsets`."""
    index = band.index[:, offsets]
    return x.index_select(1, index.reshape(-1)).view(x.shape[0], *index.shape, *x.shape[2:])


def _band_gram(v_x: Tensor, v_y: Tensor, band: _Band) -> Tensor:
    """(h, L_y, w): <V_x[index[j, r]], V_y[j]> where valid, else 0."""
    groups = _offset_groups(band, v_y.shape[0] * v_y.shape[1] * v_y.shape[2])
    grams = [(_gather_band(v_x, band, r) * v_y.unsqueeze(2)).sum(-1) for r in groups]
    return (grams[0] if len(grams) == 1 else torch.cat(grams, dim=-1)) * band.valid


def _band_apply(q_x: Tensor, gram: Tensor, band: _Band) -> Tensor:
    """x[h, j, i] = Σ_r q_x[h, index[j, r], i] · gram[h, j, r]  (h, L_y, S), token-major."""
    out = None
    for r in _offset_groups(band, q_x.shape[0] * band.index.shape[0] * q_x.shape[2]):
        part = (_gather_band(q_x, band, r) * gram[..., r, None]).sum(2)
        out = part if out is None else out + part
    return out


def _band_pair_weights(weighted_q: Tensor, q_x: Tensor, band: _Band) -> Tensor:
    """P[h, j, r] = Σ_i weighted_q[h, j, i] · q_x[h, index[j, r], i] where valid, else 0."""
    groups = _offset_groups(band, weighted_q.shape[0] * weighted_q.shape[1] * weighted_q.shape[2])
    weights = [(_gather_band(q_x, band, r) * weighted_q.unsqueeze(2)).sum(-1) for r in groups]
    return (weights[0] if len(weights) == 1 else torch.cat(weights, dim=-1)) * band.valid


def _band_combine(weights: Tensor, v_x: Tensor, band: _Band) -> Tensor:
    """out[h, j] = Σ_r weights[h, j, r] · V_x[h, index[j, r]]  (h, L_y, D)."""
    out = None
    for r in _offset_groups(band, v_x.shape[0] * band.index.shape[0] * v_x.shape[2]):
        part = (weights[..., r, None] * _gather_band(v_x, band, r)).sum(2)
        out = part if out is None else out + part
    return out


def _per_token(per_pair: Tensor, seg: _Segments) -> Tensor:
    """(h, S_i, S_k) values per (query i, segment k) -> (h, L, S_i): the value of token j's segment
    (0 for a token without one), token-major."""
    return per_pair.transpose(1, 2).index_select(1, seg.index) * seg.member


def _segment_sum(per_token: Tensor, seg: _Segments, n_segments: int) -> Tensor:
    """(h, L, S_i) token-major -> (h, S_i, S_k): sum over the tokens of each segment k (tokens
    without a segment add 0)."""
    out = per_token.new_zeros(per_token.shape[0], n_segments, per_token.shape[2])
    return out.index_add_(1, seg.index, per_token * seg.member).transpose(1, 2)


@dataclass
class _PairTerms:
    """n_t, n_s, c per pair (h, S, S) and the banded products the backward needs."""

    n_t: Tensor
    n_s: Tensor
    c: Tensor
    x_tt: Tensor
    x_ss: Tensor
    x_ts: Tensor
    x_st: Tensor | None

    @classmethod
    def compute(cls, layout: _Layout, tq, tv, sq, sv, *, with_x_st: bool = False) -> "_PairTerms":
        x_tt = _band_apply(tq, _band_gram(tv, tv, layout.tt), layout.tt)
        x_ss = _band_apply(sq, _band_gram(sv, sv, layout.ss), layout.ss)
        x_ts = _band_apply(tq, _band_gram(tv, sv, layout.ts), layout.ts)
        x_st = _band_apply(sq, _band_gram(sv, tv, layout.st), layout.st) if with_x_st else None
        n = layout.n_segments
        return cls(n_t=_segment_sum(x_tt * tq, layout.t_seg, n), n_s=_segment_sum(x_ss * sq, layout.s_seg, n),
                   c=_segment_sum(x_ts * sq, layout.s_seg, n), x_tt=x_tt, x_ss=x_ss, x_ts=x_ts, x_st=x_st)


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
