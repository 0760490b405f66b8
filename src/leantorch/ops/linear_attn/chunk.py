"""Chunkwise mode: attention inside each chunk of ``chunk_size`` positions is computed in parallel
(a masked chunk_size x chunk_size matrix), and chunks are joined by the recurrent state.

For n positions, C = chunk_size, feature/key size f and value size e, the work is
``n * C * (f + e)`` MACs inside chunks plus ``2 * n * f * e`` MACs for reading and updating the
state: linear in n. Memory is O(n (f + e) + (n / C) f e).

Execution: the sequence is processed in *segments* of several chunks (about 4 MiB of q/k/v per
segment). Inside a segment every chunk is handled at once with batched matmuls; the state is
carried from segment to segment. This keeps temporaries in cache and avoids allocating
sequence-sized buffers, without changing the math.

Gated linear attention, stably
------------------------------
Inside a chunk let ``b_t = sum_{r=chunk start..t} log_decay_r`` (per key channel, <= 0 and
decreasing). Then

    o_t = (q_t * e^{b_t}) S_prev + sum_{s <= t} [sum_i q_ti k_si e^{b_ti - b_si}] v_s
    S_next = diag(e^{b_last}) S_prev + sum_s (k_s * e^{b_last - b_s})^T v_s

Every exponent in the inter-chunk terms is <= 0, so they cannot overflow. The intra-chunk score
``e^{b_t - b_s}`` (t >= s) is computed as a matmul by factoring it through a *reference point*
``r`` of the query's sub-block: ``(q_t e^{b_t - b_r}) . (k_s e^{b_r - b_s})``. With ``r`` at the
start of the query's sub-block, the query factor is <= 1 and the key factor is <= 1 for every key
before the sub-block, and at most ``e^{spread}`` for keys inside it, where ``spread`` is the
decay accumulated over the sub-block. Products of floats keep their relative precision, so this
is exactly as accurate as the elementwise form as long as nothing overflows or underflows, which
we guarantee by choosing the sub-block size per segment: the largest of
``chunk_size, chunk_size / 2, ... , 2`` (powers of two dividing it) whose spread is at most
``log(float max) / 4`` (22 in float32, 177 in float64), falling back to sub-blocks of 1
position, where the reference is the query itself and every factor is <= 1 (the elementwise
log-space form, always safe, O(C^2 d) memory per chunk). This generalises the secondary chunking
of the GLA paper (Yang et al., 2023): its inter-sub-chunk blocks use the same reference points,
and its intra-sub-chunk blocks are our fallback. With the gates GLA uses (``logsigmoid(x) / 16``)
a chunk of 64 decays by far less than e^-22, so the whole chunk is one sub-block (reference at
the chunk start, ``q e^{b}`` doubling as the inter-chunk query) and costs no more than
ungated linear attention plus a few elementwise passes.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from leantorch.ops.linear_attn._common import finish, with_ones
from leantorch.ops.linear_attn.feature_maps import FeatureMap

__all__ = ["gla_chunk", "linear_chunk"]

# Bytes of q/k/v (all batch and heads together) handled per segment.
_SEGMENT_BYTES = 1 << 22


def _segment_len(x: torch.Tensor, width: int, chunk_size: int) -> int:
    """Positions per segment: a multiple of chunk_size with about _SEGMENT_BYTES of inputs."""
    per_position = x.shape[0] * x.shape[1] * width * x.element_size()
    return max(1, _SEGMENT_BYTES // (per_position * chunk_size)) * chunk_size


def _pad_positions(x: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad dim 2 (positions) of ``x`` up to ``length``."""
    if x.shape[2] == length:
        return x
    return F.pad(x, (0, 0, 0, length - x.shape[2]))


class _Gather:
    """Collects per-segment outputs along positions (dim 2) into ``shape``. Outputs that need no
    gradient are copied straight into the final tensor while still in cache; outputs that do are
    concatenated at the end (copying them into slices would chain one full-size CopySlices node
    per segment in backward)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape
        self.pieces: list[torch.Tensor] = []
        self.out: torch.Tensor | None = None

    def add(self, start: int, piece: torch.Tensor) -> None:
        if self.out is None and (self.pieces or piece.requires_grad):
            self.pieces.append(piece)
            return
        if self.out is None:
            self.out = piece.new_empty(self.shape)
        self.out[:, :, start:start + piece.shape[2]] = piece

    def result(self) -> torch.Tensor:
        if self.out is not None:
            return self.out
        return torch.cat(self.pieces, dim=2) if len(self.pieces) > 1 else self.pieces[0]


def _chunked(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """(batch, heads, n, d) -> (batch, heads, n_chunks, chunk_size, d), padding the last chunk."""
    n_chunks = -(-x.shape[2] // chunk_size)
    return _pad_positions(x, n_chunks * chunk_size).unflatten(2, (n_chunks, chunk_size))


# --------------------------------------------------------------------------------------------
# linear attention (no decay)


def linear_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor,
    *,
    phi: FeatureMap,
    causal: bool,
    chunk_size: int,
    normalize: bool,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunkwise linear attention.

    q: (batch, heads, n, head_dim) with n == k_len when causal (a longer key prefix has been
    folded into ``state``); k: (batch, heads, k_len, head_dim); v: (batch, heads, k_len,
    value_dim); state: (batch, heads, feat_dim, e) with e = value_dim + 1 when it carries the key
    sum (see :func:`with_ones`), else value_dim. The feature map, the extra column of ones and the
    normalisation are applied segment by segment, while the data is in cache. Returns out
    (batch, heads, n, value_dim) and the final state.
    """
    value_dim = v.shape[-1]
    carries_sum = state.shape[-1] == value_dim + 1

    def values(x: torch.Tensor) -> torch.Tensor:
        return with_ones(x) if carries_sum else x

    if not causal:  # every query sees every key: one state for all
        state = state + phi(k).transpose(-1, -2) @ values(v)
        return finish(phi(q) @ state, value_dim, normalize, eps), state
    n = k.shape[2]
    if n == 0:
        return q.new_zeros(*q.shape[:3], value_dim), state
    segment = _segment_len(k, state.shape[-2] * 2 + state.shape[-1], chunk_size)
    outputs = _Gather((*q.shape[:3], value_dim))
    for start in range(0, n, segment):
        stop = min(start + segment, n)
        out, state = _linear_segment(
            phi(q[:, :, start:stop]), phi(k[:, :, start:stop]), values(v[:, :, start:stop]),
            state, chunk_size)
        outputs.add(start, finish(out, value_dim, normalize, eps))
    return outputs.result(), state


def _linear_segment(
    fq: torch.Tensor, fk: torch.Tensor, values: torch.Tensor, state: torch.Tensor, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, heads, length, _ = fq.shape
    qc, kc = _chunked(fq, chunk_size), _chunked(fk, chunk_size)  # (b, h, N, C, f)
    n_chunks = qc.shape[2]
    vc = _chunked(values, chunk_size).reshape(-1, chunk_size, values.shape[-1])  # (b*h*N, C, e)
    scores = (qc @ kc.transpose(-1, -2)).tril_()  # causal inside each chunk
    written = kc.flatten(0, 2).transpose(1, 2) @ vc  # (b*h*N, f, e): what each chunk adds
    through = written.unflatten(0, (batch, heads, n_chunks)).cumsum(dim=2)
    # the state each chunk starts from: the initial one plus every earlier chunk's
    starts = torch.cat([state.unsqueeze(2), through[:, :, :-1] + state.unsqueeze(2)], dim=2)
    out = qc.flatten(0, 2) @ starts.flatten(0, 2)
    out = out.baddbmm_(scores.flatten(0, 2), vc)  # + the intra-chunk part, in place
    out = out.unflatten(0, (batch, heads, n_chunks)).flatten(2, 3)[:, :, :length]
    return out, state + through[:, :, -1]


# --------------------------------------------------------------------------------------------
# gated linear attention


def _spread_limit(dtype: torch.dtype) -> float:
    """Largest decay (in log space) a factor may undo: e^{+-limit} stays far from overflow and
    underflow, with room for the q and k magnitudes."""
    return math.log(torch.finfo(dtype).max) / 4


def sub_chunk_candidates(chunk_size: int, requested: int | None) -> list[int]:
    """Sub-block sizes to try, largest first: the requested one (or the chunk and its
    power-of-two divisors), then 1 (always safe)."""
    if requested is not None:
        return [requested] if requested == 1 else [requested, 1]
    sizes = [chunk_size]
    size = 1 << (chunk_size.bit_length() - 1)
    while size > 1:
        if size < chunk_size and chunk_size % size == 0:
            sizes.append(size)
        size //= 2
    return sizes if sizes[-1] == 1 else [*sizes, 1]


def choose_sub_chunk(within: torch.Tensor, candidates: list[int]) -> int:
    """The first candidate sub-block size whose factors stay in range.

    within: (..., C, key_dim), the cumulative log decay from each chunk's start (inclusive).
    """
    chunk_size = within.shape[-2]
    limit = _spread_limit(within.dtype)
    within = within.detach()
    for size in candidates:
        if size == 1:
            return 1
        if size == chunk_size:  # reference just before the chunk (log decay 0)
            spread = -within[..., -1, :]
        else:  # reference at each sub-block's first position
            blocks = within.unflatten(-2, (chunk_size // size, size))
            spread = blocks[..., 0, :] - blocks[..., -1, :]
        if spread.numel() == 0 or spread.max().item() <= limit:
            return size
    return 1


class ChunkTerms(NamedTuple):
    """The per-chunk pieces of GLA (shapes for a chunk of C positions, key size dk).

    - ``scores`` (..., C, C), lower triangular: ``sum_i q_ti k_si e^{within_ti - within_si}``.
    - ``q_read`` (..., C, dk): ``q e^{within}``, reads the state the chunk starts from.
    - ``k_write`` (..., C, dk): writes the state the chunk ends with. If ``decay_after`` is
      False it is ``k e^{within_last - within}`` and ``S_next = diag(e^{within_last}) S_prev +
      k_write^T v``; if True it is ``k e^{-within}`` and ``S_next = diag(e^{within_last})
      (S_prev + k_write^T v)``, which saves a pass over the keys.
    """

    scores: torch.Tensor
    q_read: torch.Tensor
    k_write: torch.Tensor
    decay_after: bool


def decayed_chunk_scores(
    qc: torch.Tensor, kc: torch.Tensor, within: torch.Tensor, sub_chunk: int
) -> ChunkTerms:
    """The intra-chunk part of GLA, stably (see the module docstring).

    qc, kc, within: (..., C, key_dim), ``within`` the cumulative log decay from the chunk start
    (inclusive); ``sub_chunk`` from :func:`choose_sub_chunk`.
    """
    chunk_size = within.shape[-2]
    if sub_chunk == chunk_size:
        # One sub-block, referenced just before the chunk: q e^{b} <= |q|, k e^{-b} <=
        # e^{spread} |k|.
        growth = within.exp()
        q_read = qc * growth
        k_inv = kc / growth
        scores = (q_read @ k_inv.transpose(-1, -2)).tril_()
        return ChunkTerms(scores, q_read, k_inv, True)
    n_sub = chunk_size // sub_chunk
    blocks = within.unflatten(-2, (n_sub, sub_chunk))  # (..., J, c, dk)
    reference = blocks[..., :1, :]  # (..., J, 1, dk): log decay at each sub-block's start
    q_rel = qc.unflatten(-2, (n_sub, sub_chunk)) * (blocks - reference).exp()
    # Key s seen from sub-block j: e^{b_ref(j) - b_s}; keys after sub-block j are never used,
    # and are set to e^{-inf} = 0 before exponentiating so they cannot overflow.
    positions = torch.arange(chunk_size, device=qc.device)
    block_ends = torch.arange(1, n_sub + 1, device=qc.device) * sub_chunk
    after = (positions >= block_ends[:, None])[:, :, None]  # (J, C, 1)
    exponent = (reference - within.unsqueeze(-3)).masked_fill(after, float("-inf"))
    k_rel = kc.unsqueeze(-3) * exponent.exp()  # (..., J, C, dk)
    scores = (q_rel @ k_rel.transpose(-1, -2)).flatten(-3, -2).tril_()  # (..., C, C)
    last = within[..., -1:, :]
    return ChunkTerms(scores, qc * within.exp(), kc * (last - within).exp(), False)


def gla_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    state: torch.Tensor,
    *,
    scale: float,
    chunk_size: int,
    sub_chunk_size: int | None = None,
    segment: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunkwise GLA.

    q, k, log_decay: (batch, heads, n, key_dim); v: (batch, heads, n, value_dim); state:
    (batch, heads, key_dim, value_dim). The output is multiplied by ``scale`` (the same as
    scaling q). ``segment`` positions are handled per batched step (None: about 4 MiB of
    inputs). Returns out (batch, heads, n, value_dim) and the final state.
    """
    n = k.shape[2]
    if segment is None:
        segment = _segment_len(k, 3 * k.shape[-1] + v.shape[-1], chunk_size)
    candidates = sub_chunk_candidates(chunk_size, sub_chunk_size)
    if n == 0:
        return q.new_zeros(*q.shape[:3], v.shape[-1]), state
    outputs = _Gather((*q.shape[:3], v.shape[-1]))
    for start in range(0, n, segment):
        stop = min(start + segment, n)
        out, state = _gla_segment(
            q[:, :, start:stop], k[:, :, start:stop], v[:, :, start:stop],
            log_decay[:, :, start:stop], state, chunk_size, candidates, scale)
        outputs.add(start, out)
    return outputs.result(), state


def _gla_segment(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    state: torch.Tensor,
    chunk_size: int,
    candidates: list[int],
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, heads, length, _ = q.shape
    # Padded positions have k = 0 and log decay 0: they change neither the state nor the scores.
    qc, kc, gc = (_chunked(x, chunk_size) for x in (q, k, log_decay))
    n_chunks = qc.shape[2]
    vc = _chunked(v, chunk_size).reshape(-1, chunk_size, v.shape[-1])  # one copy, used twice
    within = gc.cumsum(dim=-2)  # (b, h, N, C, dk): log decay from the chunk start
    sub_chunk = choose_sub_chunk(within, candidates)
    terms = decayed_chunk_scores(qc, kc, within, sub_chunk)
    chunk_decay = within[:, :, :, -1, :, None].exp()  # (b, h, N, dk, 1)
    written = terms.k_write.flatten(0, 2).transpose(1, 2) @ vc  # (b*h*N, dk, dv)
    written = written.unflatten(0, (batch, heads, n_chunks))
    # The decayed state recurrence is sequential over chunks (a cumulative product in linear
    # space would overflow); it touches only (dk x dv) per chunk.
    starts = []
    for added, decay in zip(written.unbind(2), chunk_decay.unbind(2), strict=True):
        starts.append(state)
        state = ((state + added) * decay if terms.decay_after
                 else torch.addcmul(added, state, decay))
    # out = scale * (q_read S_start + scores v): the scale rides on the matmuls' alpha, and the
    # intra-chunk part accumulates in place (beta = 1).
    q_read = terms.q_read.flatten(0, 2)
    starts_flat = torch.stack(starts, dim=2).flatten(0, 2)
    if scale == 1.0:
        out = q_read @ starts_flat
    else:
        out = torch.baddbmm(q_read.new_empty(()).expand(*q_read.shape[:2], vc.shape[-1]),
                            q_read, starts_flat, beta=0, alpha=scale)
    out = out.baddbmm_(terms.scores.flatten(0, 2), vc, alpha=scale)
    return out.unflatten(0, (batch, heads, n_chunks)).flatten(2, 3)[:, :, :length], state
