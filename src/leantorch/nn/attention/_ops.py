"""TEMPORARY stand-ins for leantorch.ops.attention / leantorch.ops.linear_attn, used only until
the ops agents' modules land (names resolved from the real modules when they exist)."""

from __future__ import annotations

import importlib
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


def _dense(q, k, v, *, causal=False, mask=None, key_padding_mask=None, scale=None,
           extra=None, return_weights=False):
    b, hq, nq, d = q.shape
    hk, nk = k.shape[1], k.shape[2]
    g = hq // hk
    k = k.repeat_interleave(g, 1)
    v = v.repeat_interleave(g, 1)
    scale = d ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    allowed = torch.ones(nq, nk, dtype=torch.bool, device=q.device)
    if causal:
        i = torch.arange(nq, device=q.device)[:, None] + nk - nq
        allowed = allowed & (torch.arange(nk, device=q.device)[None, :] <= i)
    allowed = allowed.expand(b, hq, nq, nk)
    if mask is not None:
        if mask.dtype == torch.bool:
            allowed = allowed & mask
        else:
            s = s + mask
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    if extra is not None:
        allowed = allowed & extra(s, allowed)
    s = s.masked_fill(~allowed, float("-inf"))
    w = torch.softmax(s, -1).nan_to_num(0.0)
    out = w @ v
    return (out, w) if return_weights else out


def naive_attention(q, k, v, *, causal=False, mask=None, key_padding_mask=None, scale=None,
                    dropout=0.0, return_weights=False):
    return _dense(q, k, v, causal=causal, mask=mask, key_padding_mask=key_padding_mask,
                  scale=scale, return_weights=return_weights)


def attention(q, k, v, *, causal=False, mask=None, key_padding_mask=None, scale=None,
              backend="auto", explain=False):
    return _dense(q, k, v, causal=causal, mask=mask, key_padding_mask=key_padding_mask,
                  scale=scale)


def sliding_window_attention(q, k, v, *, window, causal=True, dilation=1, scale=None, block=None):
    nq, nk = q.shape[2], k.shape[2]
    i = torch.arange(nq)[:, None] + nk - nq
    j = torch.arange(nk)[None, :]
    if causal:
        band = (j <= i) & (j > i - window)
    else:
        start = (i - window // 2).clamp(min=0, max=max(nk - window, 0))
        band = (j >= start) & (j < start + window)
    return _dense(q, k, v, mask=band, scale=scale)


def block_sparse_attention(q, k, v, block_mask, *, block_size, causal=False, scale=None):
    nq, nk = q.shape[2], k.shape[2]
    m = block_mask.repeat_interleave(block_size, -2).repeat_interleave(block_size, -1)
    m = m[..., :nq, :nk]
    if m.dim() == 3:
        m = m.unsqueeze(0)
    return _dense(q, k, v, causal=causal, mask=m, scale=scale)


def topk_attention(q, k, v, *, topk, causal=False, mask=None, scale=None):
    def extra(s, allowed):
        s = s.masked_fill(~allowed, float("-inf"))
        kk = min(topk, s.shape[-1])
        thr = s.topk(kk, -1).values[..., -1:]
        return s >= thr
    return _dense(q, k, v, causal=causal, mask=mask, scale=scale, extra=extra)


class LinearAttentionState(NamedTuple):
    kv: Tensor
    k_sum: Tensor


def _taylor(x):
    d = x.shape[-1]
    x = x / d ** 0.25
    x2 = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2) / 2 ** 0.5
    return torch.cat([torch.ones_like(x[..., :1]), x, x2], -1)


FEATURE_MAPS = {"elu": lambda x: F.elu(x) + 1, "relu": F.relu, "taylor": _taylor,
                "identity": lambda x: x}


def linear_attention(q, k, v, *, feature_map="elu", causal=True, normalize=True, mode="chunk",
                     chunk_size=64, eps=1e-6, initial_state=None, return_state=False):
    phi = FEATURE_MAPS[feature_map]
    fq, fk = phi(q), phi(k)
    b, h, _, f = fq.shape
    dv = v.shape[-1]
    s0 = initial_state or LinearAttentionState(fq.new_zeros(b, h, f, dv), fq.new_zeros(b, h, f))
    if causal:
        kv = s0.kv.unsqueeze(2) + torch.cumsum(fk.unsqueeze(-1) * v.unsqueeze(-2), 2)
        ks = s0.k_sum.unsqueeze(2) + torch.cumsum(fk, 2)
        out = torch.einsum("bhnf,bhnfv->bhnv", fq, kv)
        if normalize:
            out = out / (torch.einsum("bhnf,bhnf->bhn", fq, ks).unsqueeze(-1) + eps)
        state = LinearAttentionState(kv[:, :, -1], ks[:, :, -1])
    else:
        kv = fk.transpose(-1, -2) @ v
        out = fq @ kv
        if normalize:
            out = out / ((fq @ fk.sum(2).unsqueeze(-1)) + eps)
        state = None
    return (out, state) if return_state else out


def linear_attention_step(q, k, v, state, *, feature_map="elu", normalize=True, eps=1e-6):
    return linear_attention(q, k, v, feature_map=feature_map, normalize=normalize, eps=eps,
                            initial_state=state, return_state=True)


def gated_linear_attention(q, k, v, log_decay, *, scale=None, mode="chunk", chunk_size=64,
                           initial_state=None, return_state=False):
    b, h, _, dk = q.shape
    scale = dk ** -0.5 if scale is None else scale
    s = initial_state if initial_state is not None else q.new_zeros(b, h, dk, v.shape[-1])
    outs = []
    for t in range(q.shape[2]):
        s = s * log_decay[:, :, t].exp().unsqueeze(-1) + k[:, :, t].unsqueeze(-1) * v[:, :, t].unsqueeze(-2)
        outs.append((q[:, :, t] * scale).unsqueeze(-2) @ s)
    out = torch.cat(outs, 2)
    return (out, s) if return_state else out


def gla_step(q, k, v, log_decay, state, *, scale=None):
    return gated_linear_attention(q, k, v, log_decay, scale=scale, initial_state=state,
                                  return_state=True)


def naive_linear_attention(q, k, v, *, feature_map="elu", causal=True, normalize=True, eps=1e-6):
    return linear_attention(q, k, v, feature_map=feature_map, causal=causal,
                            normalize=normalize, eps=eps)


def naive_gla(q, k, v, log_decay, *, scale=None):
    return gated_linear_attention(q, k, v, log_decay, scale=scale)


def _resolve(module: str, name: str) -> Any:
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return globals()[name]


for _name in ("naive_attention", "attention", "sliding_window_attention",
              "block_sparse_attention", "topk_attention"):
    globals()[_name] = _resolve("leantorch.ops.attention", _name)
for _name in ("linear_attention", "linear_attention_step", "gated_linear_attention", "gla_step",
              "naive_linear_attention", "naive_gla", "LinearAttentionState", "FEATURE_MAPS"):
    globals()[_name] = _resolve("leantorch.ops.linear_attn", _name)
