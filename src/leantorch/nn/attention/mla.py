"""Multi-head latent attention helpers: the exact GQA -> MLA conversion (TransMLA) and the
folded (absorbed) weight matrices.

MLA (DeepSeek-V2) caches, per token, a latent ``c = x W_DKV`` of size ``d_c`` (``kv_lora_rank``)
and one small RoPE key ``k_R = RoPE(x W_KR)`` of size ``d_R`` (``rope_dim``) shared by all heads.
Head ``h`` rebuilds ``k_h = [c W_UK_h, k_R]`` and ``v_h = c W_UV_h``. Because ``q_h . (c W_UK_h)
= (q_h W_UK_h^T) . c`` and ``softmax(.) (c W_UV_h) W_O_h = (softmax(.) c) (W_UV_h W_O_h)``, decoding
can score and average the cached latents directly (the *absorbed* form): the cache is never
up-projected, and each head attends over ``d_c + d_R`` channels of one shared KV head (MQA).

GQA -> MLA (TransMLA): a GQA layer caches ``k_g = RoPE(x W_K_g)`` and ``v_g = x W_V_g`` for its
``num_kv_heads`` KV heads. Put them side by side as the latent, ``c = x [W_K | W_V]`` (``d_c = 2 *
num_kv_heads * head_dim``, exactly GQA's cache width), and let ``W_UK_h`` / ``W_UV_h`` copy KV
head ``g = h // group`` out of it: that MLA computes exactly what the GQA layer computes.

RoPE in the conversion: GQA rotates the *whole* key, and a rotation cannot be moved into a
decoupled ``d_R``-channel part without changing the function (TransMLA's RoRoPE concentrates the
positional information there only approximately). To stay exact, the converted layer keeps RoPE on
the full key: it rotates the key half of its latent (``latent_rope_dim = num_kv_heads *
head_dim``, in blocks of ``head_dim`` with the GQA layer's frequencies) before caching, rotates the
queries' no-RoPE part the same way, and has no decoupled part (``rope_dim = 0``). Because ``W_UK``
copies whole heads it commutes with the per-head rotation, so ``RoPE(c) W_UK_h = RoPE(x W_K_g)``:
scores, outputs and cache bytes equal the GQA layer's. The absorbed form stays exact too, with
``W_UK`` applied to the rotated query at run time (it cannot be multiplied into ``W_Q`` ahead of
time, since the rotation sits between them).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from leantorch.errors import LeanError, LeanTypeError, describe
from leantorch.nn.attention.attention import Attention

__all__ = ["FoldedMLA", "fold_mla_weights", "gqa_to_mla"]


@torch.no_grad()
def gqa_to_mla(layer: Attention) -> Attention:
    """An MLA layer computing exactly what the GQA (or MHA / MQA) ``layer`` computes.

    Args:
        layer: an ``Attention`` of kind ``"exact"``. It is not modified.

    Returns:
        ``Attention(kind="mla", kv_lora_rank=2 * num_kv_heads * head_dim, rope_dim=0,
        latent_rope_dim=num_kv_heads * head_dim if layer.rope else 0)`` with the same dtype and
        device, whose ``W_DKV = [W_K | W_V]`` and whose ``W_UK`` / ``W_UV`` copy each KV head to
        the query heads of its group. Its KV cache takes as many bytes per token as the GQA
        layer's.
    """
    if not isinstance(layer, Attention):
        raise LeanTypeError(f"gqa_to_mla: layer={describe(layer)}; expected a "
                            "leantorch.nn.attention.Attention")
    if layer.kind != "exact":
        raise LeanError(f"gqa_to_mla: layer.kind={layer.kind!r}; expected 'exact' (a "
                        "GQA/MHA/MQA softmax attention layer)")
    heads, kv_heads, hd = layer.num_heads, layer.num_kv_heads, layer.head_dim
    weight = layer.q_proj.weight
    mla = Attention(
        layer.dim, heads, kind="mla", head_dim=hd, causal=layer.causal,
        kv_lora_rank=2 * kv_heads * hd, rope_dim=0,
        latent_rope_dim=kv_heads * hd if layer.rope else None, rope=layer.rope,
        rope_base=layer.rope_base, qkv_bias=layer.q_proj.bias is not None,
        proj_bias=layer.o_proj.bias is not None, dropout=layer.dropout.p,
        layer_idx=layer.layer_idx,
    ).to(device=weight.device, dtype=weight.dtype)
    mla.train(layer.training)
    mla.q_proj.weight.copy_(layer.q_proj.weight)
    mla.kv_down.weight.copy_(torch.cat((layer.k_proj.weight, layer.v_proj.weight)))
    if layer.q_proj.bias is not None:
        mla.q_proj.bias.copy_(layer.q_proj.bias)
        mla.kv_down.bias.copy_(torch.cat((layer.k_proj.bias, layer.v_proj.bias)))
    eye = torch.eye(hd, dtype=weight.dtype, device=weight.device)
    mla.k_up.weight.zero_()
    mla.v_up.weight.zero_()
    for h in range(heads):
        g = h // layer.group
        rows = slice(h * hd, (h + 1) * hd)
        mla.k_up.weight[rows, g * hd:(g + 1) * hd] = eye
        mla.v_up.weight[rows, (kv_heads + g) * hd:(kv_heads + g + 1) * hd] = eye
    mla.o_proj.weight.copy_(layer.o_proj.weight)
    if layer.o_proj.bias is not None:
        mla.o_proj.bias.copy_(layer.o_proj.bias)
    return mla


class FoldedMLA(NamedTuple):
    """Weights of MLA's absorbed form multiplied out.

    ``query_weight (heads * d_c, dim)`` and ``query_bias (heads * d_c,)`` or None: ``x ->
    [q_nope_h W_UK_h^T]_h`` in one matmul (W_UK folded into the query projection);
    ``output_weight (dim, heads * d_c)``: ``[o_latent_h]_h -> y`` in one matmul (W_UV folded into
    the output projection; add ``o_proj.bias`` if any).
    """

    query_weight: Tensor
    query_bias: Tensor | None
    output_weight: Tensor


def fold_mla_weights(layer: Attention) -> FoldedMLA:
    """Multiply W_UK into the query projection and W_UV into the output projection.

    The absorbed path of :class:`Attention` applies ``W_UK_h`` to ``q_nope_h`` and ``W_UV_h`` to
    the latent output at run time instead: the same products in another order, and cheaper
    whenever ``d_c`` exceeds ``head_dim`` (per token ``dim * heads * d_c`` MACs for the folded
    query vs ``dim * heads * head_dim + heads * head_dim * d_c`` unfolded). Not defined for a
    layer with ``latent_rope_dim > 0`` (a converted GQA layer), where RoPE sits between W_Q and
    W_UK.
    """
    if not isinstance(layer, Attention) or layer.kind != "mla":
        raise LeanError(f"fold_mla_weights: layer={describe(layer)}; expected an Attention of "
                        "kind 'mla'")
    if layer.latent_rope_dim:
        raise LeanError(f"fold_mla_weights: layer.latent_rope_dim={layer.latent_rope_dim}; the "
                        "rotation between W_Q and W_UK prevents folding them (the absorbed "
                        "forward applies W_UK after RoPE instead)")
    heads, hd, dc, dv = layer.num_heads, layer.head_dim, layer.kv_lora_rank, layer.value_dim
    w_q = layer.q_proj.weight.view(heads, hd + layer.rope_dim, layer.dim)[:, :hd]
    w_uk = layer.k_up.weight.view(heads, hd, dc)
    query_weight = torch.einsum("hdc,hdm->hcm", w_uk, w_q).reshape(heads * dc, layer.dim)
    query_bias = None
    if layer.q_proj.bias is not None:
        b_q = layer.q_proj.bias.view(heads, hd + layer.rope_dim)[:, :hd]
        query_bias = torch.einsum("hd,hdc->hc", b_q, w_uk).reshape(heads * dc)
    w_uv = layer.v_up.weight.view(heads, dv, dc)
    w_o = layer.o_proj.weight.view(layer.dim, heads, dv)
    output_weight = torch.einsum("mhv,hvc->mhc", w_o, w_uv).reshape(layer.dim, heads * dc)
    return FoldedMLA(query_weight, query_bias, output_weight)
