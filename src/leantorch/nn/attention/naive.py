"""The readable reference of :class:`~leantorch.nn.attention.Attention`: what a layer computes,
from its weights, with the naive ops and explicit dense masks (every score materialised).

``naive_attention_forward(layer, x)`` is the oracle the module's fast paths (the kinds' ops, the
cache, the absorbed MLA form) are tested against. It shares the layer's parameters and rotary
embeddings but none of its attention code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from leantorch.nn.attention.attention import Attention
from leantorch.ops.attention import naive_attention
from leantorch.ops.linear_attn import naive_gla, naive_linear_attention

__all__ = ["dense_mask", "naive_attention_forward"]


def dense_mask(layer: Attention, n: int, scores: Tensor | None = None) -> Tensor:
    """Which keys each query may see, as a boolean ``(heads or 1, n, n)`` for a sequence of
    ``n`` tokens (queries and keys at positions 0..n-1). ``topk`` needs ``scores (batch, heads,
    n, n)`` and returns ``(batch, heads, n, n)``."""
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    allowed = (j <= i) if layer.causal else torch.ones(n, n, dtype=torch.bool)
    if layer.kind in ("sliding", "based"):
        w = layer.window
        if layer.causal:
            allowed = allowed & (j > i - w)
        else:  # centred window of w keys, shifted inward at the borders
            start = (i - w // 2).clamp(min=0, max=max(n - w, 0))
            allowed = (j >= start) & (j < start + w)
    if layer.kind == "block_sparse":
        blocks = -(-n // layer.block_size)
        mask = layer.block_mask(blocks, blocks) if callable(layer.block_mask) \
            else layer.block_mask
        expanded = mask[:, i[:, 0] // layer.block_size][:, :, j[0] // layer.block_size]
        allowed = allowed & expanded
    if layer.kind == "topk":
        masked = scores.masked_fill(~allowed, float("-inf"))
        kth = masked.topk(min(layer.topk, n), dim=-1).values[..., -1:]
        allowed = allowed & (masked >= kth)
    return allowed.unsqueeze(0) if allowed.dim() == 2 else allowed


def _heads(x: Tensor, heads: int) -> Tensor:
    return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def naive_attention_forward(layer: Attention, x: Tensor) -> Tensor:
    """``layer(x)`` recomputed plainly: ``x (batch, n, dim) -> (batch, n, dim)`` (no dropout)."""
    batch, n, _ = x.shape
    positions = torch.arange(n)
    group = layer.num_heads // layer.num_kv_heads

    def rope(t: Tensor) -> Tensor:
        return t if layer.rotary is None else layer.rotary(t, positions)

    if layer.kind == "mla":
        # Unabsorbed MLA, spelled out: per-head keys [c W_UK, k_rope], values c W_UV.
        q = _heads(layer.q_proj(x), layer.num_heads)
        q_nope, q_rope = q.split((layer.head_dim, layer.rope_dim), dim=-1)
        latent = layer.kv_down(x)
        if layer.latent_rope_dim:  # rotate the key blocks of the latent, and the queries
            blocks = latent[..., : layer.latent_rope_dim].unflatten(-1, (-1, layer.head_dim))
            rotated = layer.latent_rotary(blocks.transpose(1, 2), positions).transpose(1, 2)
            latent = torch.cat((rotated.flatten(-2), latent[..., layer.latent_rope_dim:]), -1)
            q_nope = layer.latent_rotary(q_nope, positions)
        k = _heads(layer.k_up(latent), layer.num_heads)
        if layer.rope_dim:
            q_rope = layer.rope_rotary(q_rope, positions)
            k_rope = layer.rope_rotary(layer.k_rope_proj(x).unsqueeze(1), positions)
            k = torch.cat((k, k_rope.expand(-1, layer.num_heads, -1, -1)), -1)
        v = _heads(layer.v_up(latent), layer.num_heads)
        out = naive_attention(torch.cat((q_nope, q_rope), -1), k, v, scale=layer.scale,
                                  mask=dense_mask(layer, n))
    elif layer.kind in ("linear", "gla"):
        q = rope(_heads(layer.q_proj(x), layer.num_heads))
        k = rope(_heads(layer.k_proj(x), layer.num_kv_heads)).repeat_interleave(group, 1)
        v = _heads(layer.v_proj(x), layer.num_kv_heads).repeat_interleave(group, 1)
        if layer.kind == "linear":
            out = naive_linear_attention(q, k, v, feature_map=layer.feature_map,
                                             causal=layer.causal, normalize=layer.normalize)
        else:
            log_decay = _heads(F.logsigmoid(layer.gate_proj(x)) / layer.gate_normalizer,
                               layer.num_heads)
            out = naive_gla(q, k, v, log_decay)
    elif layer.kind == "based":
        # First half of the KV heads (with their query groups): Taylor linear attention on
        # feature_dim-sized queries/keys; second half: sliding-window softmax attention.
        v = _heads(layer.v_proj(x), layer.num_kv_heads)
        half = layer.linear_kv_heads
        qf = _heads(layer.q_feat(x), layer.linear_heads)
        kf = _heads(layer.k_feat(x), half)
        if layer.feature_rotary is not None:
            qf, kf = layer.feature_rotary(qf, positions), layer.feature_rotary(kf, positions)
        linear = naive_linear_attention(
            qf, kf.repeat_interleave(group, 1), v[:, :half].repeat_interleave(group, 1),
            feature_map=layer.feature_map, causal=True, normalize=layer.normalize)
        q = rope(_heads(layer.q_proj(x), layer.num_heads - layer.linear_heads))
        k = rope(_heads(layer.k_proj(x), layer.num_kv_heads - half))
        window = naive_attention(q, k, v[:, half:], mask=dense_mask(layer, n))
        out = torch.cat((linear, window), dim=1)
    else:
        q = rope(_heads(layer.q_proj(x), layer.num_heads))
        k = rope(_heads(layer.k_proj(x), layer.num_kv_heads))
        v = _heads(layer.v_proj(x), layer.num_kv_heads)
        scores = None
        if layer.kind == "topk":
            scores = (q @ k.repeat_interleave(group, 1).transpose(-1, -2)) * layer.scale
        out = naive_attention(q, k, v, mask=dense_mask(layer, n, scores))
    out = out.transpose(1, 2).reshape(batch, n, -1)
    return layer.o_proj(out)
