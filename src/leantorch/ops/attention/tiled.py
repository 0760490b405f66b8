"""Exact attention in tiles with an online softmax (FlashAttention's algorithm in plain PyTorch),
and :func:`attention`, which dispatches among torch SDPA, the tiled kernel and the reference.

Forward, per query block and per key tile: scores S = (scale Q) K^T, running row max m, running
row sum l and unnormalised output O, so the (q_len x k_len) matrix never exists: memory is one
(block_q x block_k) tile per (batch, KV head). Backward recomputes each tile's probabilities
from the saved logsumexp, so autograd keeps only q, k, v, out and the logsumexp: O(n d).

Two CPU-minded details keep the elementwise work per score down to one exp and one row sum:
- the row shift rides inside the matmul: Q is extended by a column holding -m and K by a row
  of ones (K is kept transposed, (dim + 1, seq), the layout BLAS runs fastest), so
  [Q, -m] [K, 1]^T = Q K^T - m and P = exp of the matmul's output in place;
- the shift is updated lazily: once a row has a finite max, later tiles reuse it, and a query
  block is redone with the exact running max only if a row sum ends above 2^64 (or overflows),
  one check per block. The result is the same softmax (the shift cancels exactly); only
  rounding differs, and the sums stay far from overflow.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from leantorch.errors import LeanError, describe
from leantorch.ops.attention._common import (
    AttentionShapes,
    causal_allowed,
    check_key_padding_mask,
    check_mask,
    check_positive_int,
    check_qkv,
    resolve_scale,
)
from leantorch.ops.attention.naive import naive_attention

__all__ = ["BACKENDS", "attention", "tiled_attention"]

logger = logging.getLogger("leantorch.attention")

BACKENDS = ("auto", "sdpa", "tiled", "naive")

# a query block computed with a stale row shift is kept when its row sums stay below this
_LAZY_ROW_SUM_LIMIT = 2.0**64


class _Masks:
    """The masks of one call, sliced per tile in the grouped layout (batch, kv_heads, groups,
    rows, keys) that the kernel uses."""

    def __init__(self, shapes: AttentionShapes, causal: bool, mask: Tensor | None,
                 key_padding_mask: Tensor | None, dtype: torch.dtype) -> None:
        self.shapes = shapes
        self.causal = causal
        b, hq, hk, nq, nk = (shapes.batch, shapes.q_heads, shapes.kv_heads, shapes.q_len,
                             shapes.k_len)
        full = (b, hq, nq, nk)
        grouped = (b, hk, shapes.groups, nq, nk)
        self.blocked: Tensor | None = None  # True = may not attend
        self.additive: Tensor | None = None
        if mask is not None:
            if mask.dtype == torch.bool:
                self.blocked = (~mask).expand(full).view(grouped)
            else:
                self.additive = mask.to(dtype).expand(full).view(grouped)
        self._causal_cache: dict[tuple[int, int, int], Tensor] = {}
        self.padding: Tensor | None = None
        if key_padding_mask is not None:
            self.padding = (~key_padding_mask)[:, None, None, None, :]

    def visible_keys(self, q0: int, q1: int) -> int:
        """Keys any query of rows q0:q1 may see: with ``causal``, none after the last query's
        position, so the key tiles of a query block stop there (the diagonal tile is cut
        short instead of computed and masked)."""
        if not self.causal:
            return self.shapes.k_len
        last = q1 - 1 + self.shapes.k_len - self.shapes.q_len
        return max(0, min(self.shapes.k_len, last + 1))

    def tile_state(self, q0: int, q1: int, k0: int, k1: int) -> str:
        """"skip" (no pair of the tile is causally allowed), "full" or "partial"."""
        if not self.causal:
            return "full"
        offset = self.shapes.k_len - self.shapes.q_len
        if k0 > q1 - 1 + offset:
            return "skip"
        return "full" if k1 - 1 <= q0 + offset else "partial"

    def apply(self, scores: Tensor, q0: int, q1: int, k0: int, k1: int, state: str) -> Tensor:
        """Mask ``scores`` (batch * kv_heads, groups * (q1 - q0), k1 - k0) in place."""
        if state == "full" and not self.any:
            return scores
        s = self.shapes
        view = scores.view(s.batch, s.kv_heads, s.groups, q1 - q0, k1 - k0)
        if state == "partial":
            view.masked_fill_(self._causal_blocked(q0, q1, k0, k1, scores.device), -math.inf)
        if self.blocked is not None:
            view.masked_fill_(self.blocked[..., q0:q1, k0:k1], -math.inf)
        if self.padding is not None:
            view.masked_fill_(self.padding[..., k0:k1], -math.inf)
        if self.additive is not None:
            view.add_(self.additive[..., q0:q1, k0:k1])
        return scores

    def _causal_blocked(self, q0: int, q1: int, k0: int, k1: int,
                        device: torch.device) -> Tensor:
        """The future keys of a diagonal tile; tiles at the same offset share one mask."""
        key = (q0 - k0, q1 - q0, k1 - k0)
        if key not in self._causal_cache:
            s = self.shapes
            allowed = causal_allowed(s.q_len, s.k_len, device, q0, k0, q1 - q0, k1 - k0)
            self._causal_cache[key] = ~allowed
        return self._causal_cache[key]

    @property
    def any(self) -> bool:
        """Whether any mask besides the causal one applies."""
        return (self.blocked is not None or self.padding is not None
                or self.additive is not None)


def _query_rows(t: Tensor, shapes: AttentionShapes, q0: int, q1: int) -> Tensor:
    """Rows q0:q1 of every query head in the grouped layout: (batch * kv_heads, groups * rows, d)."""
    b, hk, g = shapes.batch, shapes.kv_heads, shapes.groups
    grouped = t.view(b * hk, g, t.shape[2], t.shape[3])
    return grouped[:, :, q0:q1].reshape(b * hk, g * (q1 - q0), t.shape[3])


def _with_column(t: Tensor, value: float) -> Tensor:
    """``t`` (..., dim) with one more column filled with ``value``: (..., dim + 1)."""
    out = t.new_empty(*t.shape[:-1], t.shape[-1] + 1)
    out[..., :-1] = t
    out[..., -1] = value
    return out


def _transposed_with_row(t: Tensor, value: float) -> Tensor:
    """``t`` (batch, seq, dim) as a contiguous (batch, dim + 1, seq) whose last row is ``value``.

    A key tile is then a column slice of a row-major matrix, the layout BLAS multiplies
    fastest (about 1.4x a transposed view on this CPU), and the extra row meets the extra
    column of the queries.
    """
    out = t.new_empty(t.shape[0], t.shape[2] + 1, t.shape[1])
    out[:, :-1] = t.transpose(1, 2)
    out[:, -1] = value
    return out


def _forward_block(queries: Tensor, keys_t: Tensor, values: Tensor, masks: _Masks, q0: int,
                   q1: int, block_k: int, lazy: bool) -> tuple[Tensor, Tensor, Tensor]:
    """One query block against every key tile: (unnormalised out, row sums, row shift).

    queries: (batch * kv_heads, rows, head_dim), already scaled. ``lazy``: once every row has
    a finite max, later tiles keep that shift instead of tracking the running max (the caller
    checks the row sums afterwards); otherwise the shift follows the running max exactly.
    """
    rows_total, rows = queries.shape[0], queries.shape[1]
    # [Q, -m]: the last column carries the (safe) row shift into the matmul with [K, 1]^T
    queries_ext = _with_column(queries, 0.0)
    row_max = queries.new_full((rows_total, rows, 1), -math.inf)  # -inf: no allowed key yet
    acc = queries.new_zeros(rows_total, rows, values.shape[2])
    total = queries.new_zeros(rows_total, rows, 1)
    shift_known = False  # every row has a finite max
    visible = masks.visible_keys(q0, q1)
    for k0 in range(0, visible, block_k):
        k1 = min(k0 + block_k, visible)
        state = masks.tile_state(q0, q1, k0, k1)
        if state == "skip":
            continue
        scores = masks.apply(torch.bmm(queries_ext, keys_t[:, :, k0:k1]), q0, q1, k0, k1,
                             state)
        if lazy and shift_known:
            total.add_(scores.exp_().sum(-1, keepdim=True))
            acc.baddbmm_(scores, values[:, k0:k1])
            continue
        safe_old = queries_ext[:, :, -1:].neg()  # the shift the scores already carry
        new_max = torch.maximum(row_max, scores.amax(-1, keepdim=True) + safe_old)
        safe_new = new_max.masked_fill(new_max == -math.inf, 0.0)
        scores.sub_(safe_new - safe_old).exp_()
        # rows with no finite max yet have acc = 0: rescale by 0 to avoid inf * 0
        rescale = torch.exp(safe_old - safe_new).masked_fill_(row_max == -math.inf, 0.0)
        total.mul_(rescale).add_(scores.sum(-1, keepdim=True))
        acc.mul_(rescale).baddbmm_(scores, values[:, k0:k1])
        row_max = new_max
        queries_ext[:, :, -1:] = -safe_new
        shift_known = bool(torch.isfinite(row_max).all())
    return acc, total, queries_ext[:, :, -1:].neg()


def _tiled_forward(q: Tensor, k: Tensor, v: Tensor, shapes: AttentionShapes, scale: float,
                   masks: _Masks, block_q: int, block_k: int) -> tuple[Tensor, Tensor]:
    """out (batch, q_heads, q_len, value_dim) and logsumexp (batch * kv_heads, groups, q_len)
    of the scaled scores (-inf for a query with no allowed key)."""
    b, hk, g, nq, nk, dv = (shapes.batch, shapes.kv_heads, shapes.groups, shapes.q_len,
                            shapes.k_len, shapes.value_dim)
    rows_total = b * hk
    keys_t = _transposed_with_row(k.reshape(rows_total, nk, shapes.head_dim), 1.0)
    values = v.reshape(rows_total, nk, dv)
    out = q.new_empty(b, shapes.q_heads, nq, dv)
    out_grouped = out.view(rows_total, g, nq, dv)
    lse = q.new_empty(rows_total, g, nq)
    for q0 in range(0, nq, block_q):
        q1 = min(q0 + block_q, nq)
        queries = _query_rows(q, shapes, q0, q1) * scale
        acc, total, shift = _forward_block(queries, keys_t, values, masks, q0, q1, block_k,
                                           lazy=True)
        # the lazy shift is safe when every row sum stays small (NaN and inf fail the test);
        # otherwise the block is redone with the exact running max (rare: a score more than
        # ~44 above the row's first-tile max)
        if not bool((total <= _LAZY_ROW_SUM_LIMIT).all()):
            acc, total, shift = _forward_block(queries, keys_t, values, masks, q0, q1,
                                               block_k, lazy=False)
        block_out = acc.div_(total.masked_fill(total == 0, 1.0))
        out_grouped[:, :, q0:q1] = block_out.view(rows_total, g, q1 - q0, dv)
        lse[:, :, q0:q1] = (shift + total.log()).view(rows_total, g, q1 - q0)
    return out, lse


def _tiled_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                    lse: Tensor, shapes: AttentionShapes, scale: float, masks: _Masks,
                    block_q: int, block_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv by recomputing each tile's probabilities P = exp(S - lse)."""
    b, hk, g, nq, nk, d, dv = (shapes.batch, shapes.kv_heads, shapes.groups, shapes.q_len,
                               shapes.k_len, shapes.head_dim, shapes.value_dim)
    rows_total = b * hk
    keys = k.reshape(rows_total, nk, d)
    keys_t = _transposed_with_row(keys, 1.0)
    values_t = _transposed_with_row(v.reshape(rows_total, nk, dv), 1.0)
    # D = rowsum(dO * O): dS = P * (dP - D) is the softmax backward
    delta = (grad_out * out).sum(-1).view(rows_total, g, nq)
    # a row with no allowed key has lse = -inf; its scores are all masked, so P = 0 anyway
    lse_safe = lse.masked_fill(lse == -math.inf, 0.0)
    grad_q = torch.empty_like(q)
    grad_q_grouped = grad_q.view(rows_total, g, nq, d)
    grad_k = q.new_zeros(rows_total, nk, d)
    grad_v = q.new_zeros(rows_total, nk, dv)
    for q0 in range(0, nq, block_q):
        q1 = min(q0 + block_q, nq)
        rows = g * (q1 - q0)
        queries_ext = _with_column(_query_rows(q, shapes, q0, q1) * scale, 0.0)
        queries_ext[:, :, -1] = -lse_safe[:, :, q0:q1].reshape(rows_total, rows)
        queries_scaled = queries_ext[:, :, :-1]
        grad_out_ext = _with_column(_query_rows(grad_out, shapes, q0, q1), 0.0)
        grad_out_ext[:, :, -1] = -delta[:, :, q0:q1].reshape(rows_total, rows)
        grad_out_rows = grad_out_ext[:, :, :-1]
        grad_q_rows = q.new_zeros(rows_total, rows, d)
        visible = masks.visible_keys(q0, q1)
        for k0 in range(0, visible, block_k):
            k1 = min(k0 + block_k, visible)
            state = masks.tile_state(q0, q1, k0, k1)
            if state == "skip":
                continue
            # [scale Q, -lse] [K, 1]^T = S - lse, so P = exp(S - lse) in one pass
            probs = torch.bmm(queries_ext, keys_t[:, :, k0:k1])
            probs = masks.apply(probs, q0, q1, k0, k1, state).exp_()
            grad_v[:, k0:k1].baddbmm_(probs.transpose(1, 2), grad_out_rows)
            # [dO, -D] [V, 1]^T = dP - D, then dS = P * (dP - D)
            grad_scores = torch.bmm(grad_out_ext, values_t[:, :, k0:k1]).mul_(probs)
            grad_q_rows.baddbmm_(grad_scores, keys[:, k0:k1])
            grad_k[:, k0:k1].baddbmm_(grad_scores.transpose(1, 2), queries_scaled)
        grad_q_grouped[:, :, q0:q1] = grad_q_rows.mul_(scale).view(rows_total, g, q1 - q0, d)
    return grad_q, grad_k.view(k.shape), grad_v.view(v.shape)


class _TiledAttention(torch.autograd.Function):
    """Tiled attention whose backward recomputes tiles: saves q, k, v, out and logsumexp only."""

    @staticmethod
    def forward(ctx, q, k, v, shapes, scale, masks, block_q, block_k):  # type: ignore[override]
        out, lse = _tiled_forward(q, k, v, shapes, scale, masks, block_q, block_k)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.config = (shapes, scale, masks, block_q, block_k)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        shapes, scale, masks, block_q, block_k = ctx.config
        grad_q, grad_k, grad_v = _tiled_backward(grad_out.contiguous(), q, k, v, out, lse,
                                                 shapes, scale, masks, block_q, block_k)
        return grad_q, grad_k, grad_v, None, None, None, None, None


def tiled_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    mask: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
    block_q: int = 128,
    block_k: int = 128,
) -> Tensor:
    """Exact softmax attention in (block_q x block_k) tiles with an online softmax.

    Equal to :func:`naive_attention` (values and gradients) without materialising the
    (q_len x k_len) scores: forward memory is one tile per (batch, KV head), and autograd saves
    q, k, v, out and a (batch, q_heads, q_len) logsumexp, O(n d); backward recomputes each tile.
    With ``causal``, tiles above the diagonal are skipped (never computed, not counted) and the
    key tiles of each query block stop at its last query's position.
    Grouped-query attention stacks the query heads of a KV head along the rows of each tile, so
    K and V are never repeated.

    Args:
        q: (batch, q_heads, q_len, head_dim).
        k: (batch, kv_heads, k_len, head_dim).
        v: (batch, kv_heads, k_len, value_dim).
        causal: bottom-right aligned (query i sees keys 0..k_len - q_len + i).
        mask: boolean (True = may attend) or additive float, broadcastable to
            (batch, q_heads, q_len, k_len); it gets no gradient.
        key_padding_mask: boolean (batch, k_len), True = real token.
        scale: default head_dim ** -0.5.
        block_q: query rows per tile (per query head).
        block_k: keys per tile.

    Returns:
        (batch, q_heads, q_len, value_dim); a query with no allowed key gives 0 (zero gradient).
    """
    op = "tiled_attention"
    shapes = check_qkv(op, q, k, v)
    check_mask(op, mask, shapes)
    check_key_padding_mask(op, key_padding_mask, shapes)
    scale = resolve_scale(op, scale, shapes.head_dim)
    check_positive_int(op, "block_q", block_q)
    check_positive_int(op, "block_k", block_k)
    masks = _Masks(shapes, bool(causal), mask, key_padding_mask, q.dtype)
    return _TiledAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), shapes, scale,
                                 masks, block_q, block_k)


# SDPA's fused CPU kernel needs head_dim == value_dim; otherwise torch runs its math path,
# which materialises the scores: above this many bytes of scores, auto prefers the tiled kernel.
_SDPA_MATH_SCORE_BYTES = 1 << 30


def _sdpa_plan(q: Tensor, shapes: AttentionShapes, causal: bool, mask: Tensor | None,
               key_padding_mask: Tensor | None) -> tuple[bool, str]:
    """Whether torch SDPA computes exactly what was asked, and why (not)."""
    masked = mask is not None or key_padding_mask is not None
    partial_causal = causal and shapes.q_len not in (1, shapes.k_len)
    if q.device.type != "cpu" and (masked or partial_causal):
        # fully masked rows give 0 in SDPA's CPU kernels (tested); not verified on other devices
        return False, (f"masks on {q.device.type}: SDPA's handling of fully masked rows is "
                       "only verified on CPU")
    if shapes.head_dim != shapes.value_dim:
        score_bytes = (shapes.batch * shapes.q_heads * shapes.q_len * shapes.k_len
                       * q.element_size())
        if score_bytes > _SDPA_MATH_SCORE_BYTES:
            return False, (f"head_dim {shapes.head_dim} != value_dim {shapes.value_dim}: SDPA "
                           f"would use its math path and hold {score_bytes / 2**30:.1f} GiB "
                           "of scores")
    return True, "SDPA computes the same attention (fused kernel, GQA native)"


def _sdpa(q: Tensor, k: Tensor, v: Tensor, shapes: AttentionShapes, causal: bool,
          mask: Tensor | None, key_padding_mask: Tensor | None, scale: float) -> Tensor:
    """torch SDPA with the package's conventions: bottom-right causal, masks merged."""
    is_causal = causal and shapes.q_len == shapes.k_len
    causal_mask = causal and shapes.q_len not in (1, shapes.k_len)
    allowed: Tensor | None = None
    if causal_mask or (is_causal and (mask is not None or key_padding_mask is not None)):
        # SDPA's is_causal is top-left aligned and excludes attn_mask: pass the mask explicitly
        allowed = causal_allowed(shapes.q_len, shapes.k_len, q.device)
        is_causal = False
    if key_padding_mask is not None:
        padding = key_padding_mask[:, None, None, :]
        allowed = padding if allowed is None else allowed & padding
    attn_mask: Tensor | None
    if mask is not None and mask.dtype != torch.bool:
        attn_mask = mask.to(q.dtype)
        if allowed is not None:
            attn_mask = attn_mask.masked_fill(~allowed, -math.inf)
    elif mask is not None:
        attn_mask = mask if allowed is None else mask & allowed
    else:
        attn_mask = allowed
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                          scale=scale, enable_gqa=shapes.groups > 1)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    mask: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
    explain: bool = False,
    block_q: int = 128,
    block_k: int = 128,
) -> Tensor | tuple[Tensor, str]:
    """Exact softmax attention by the fastest equivalent backend.

    ``backend``: "sdpa" (``torch.nn.functional.scaled_dot_product_attention``), "tiled"
    (:func:`tiled_attention`), "naive" (:func:`naive_attention`) or "auto": SDPA whenever it
    computes exactly this attention (it is the fastest on CPU: see
    ``benchmarks/results/attention_softmax.json``), with the package's conventions mapped onto
    it (bottom-right causal becomes an explicit mask unless q_len == k_len or q_len == 1, key
    padding joins the mask, GQA via ``enable_gqa``); otherwise the tiled kernel. The choice is
    logged on ``logging.getLogger("leantorch.attention")`` at DEBUG level.

    Args:
        q, k, v, causal, mask, key_padding_mask, scale: as in :func:`naive_attention`.
        backend: "auto" | "sdpa" | "tiled" | "naive".
        explain: also return a one-line reason naming the backend used.
        block_q, block_k: tile sizes of the tiled backend.

    Returns:
        out (batch, q_heads, q_len, value_dim), or (out, reason) with ``explain``.
    """
    op = "attention"
    shapes = check_qkv(op, q, k, v)
    check_mask(op, mask, shapes)
    check_key_padding_mask(op, key_padding_mask, shapes)
    scale = resolve_scale(op, scale, shapes.head_dim)
    if backend not in BACKENDS:
        raise LeanError(f"attention: backend must be one of {', '.join(BACKENDS)}, got "
                        f"{describe(backend)}")
    if backend == "auto":
        use_sdpa, why = _sdpa_plan(q, shapes, bool(causal), mask, key_padding_mask)
        chosen = "sdpa" if use_sdpa else "tiled"
    else:
        chosen, why = backend, "requested"
    kwargs = {"causal": bool(causal), "mask": mask, "key_padding_mask": key_padding_mask,
              "scale": scale}
    if chosen == "sdpa":
        out = _sdpa(q, k, v, shapes, bool(causal), mask, key_padding_mask, scale)
    elif chosen == "tiled":
        out = tiled_attention(q, k, v, block_q=block_q, block_k=block_k, **kwargs)
    else:
        out = naive_attention(q, k, v, **kwargs)
    reason = f"backend={chosen}: {why}"
    logger.debug("attention %s x %s -> %s", tuple(q.shape), tuple(k.shape), reason)
    return (out, reason) if explain else out
