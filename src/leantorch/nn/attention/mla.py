"""Multi-head latent attention (kind ``"mla"``): :class:`LatentAttention` and its
:class:`MLAConfig`, the exact GQA -> MLA conversion (TransMLA) and the folded (absorbed) weight
matrices.

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

import dataclasses
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor, nn

from leantorch.errors import LeanError, LeanTypeError, describe
from leantorch.nn.attention.base import Attention, missing_hint, split_heads
from leantorch.nn.attention.rotary import RotaryEmbedding
from leantorch.ops.attention import attention
from leantorch.validate import positive_int

__all__ = ["FoldedMLA", "LatentAttention", "MLAConfig", "fold_mla_weights", "gqa_to_mla"]


@dataclass(frozen=True)
class MLAConfig:
    """``mla``: the cached latent's size and the RoPE parts.

    Args:
        kv_lora_rank: size ``d_c`` of the cached latent ``c = x W_DKV``.
        rope_dim: size of the decoupled RoPE part of queries and of the one shared RoPE key
            (default ``head_dim // 2`` with ``rope=True``, 0 without; resolved by the layer).
        latent_rope_dim: leading latent channels rotated by RoPE in blocks of ``head_dim`` (the
            queries' no-RoPE part is then rotated too). 0 for DeepSeek's MLA;
            :func:`gqa_to_mla` sets it so the converted layer keeps RoPE on the full key.
    """

    kv_lora_rank: int = field(
        metadata=missing_hint("the latent size d_c, e.g. kv_lora_rank=4 * head_dim"))
    rope_dim: int | None = None
    latent_rope_dim: int = 0

    def __post_init__(self) -> None:
        positive_int("MLAConfig", "kv_lora_rank", self.kv_lora_rank)
        if self.rope_dim is not None:
            positive_int("MLAConfig", "rope_dim", self.rope_dim, minimum=0)
        positive_int("MLAConfig", "latent_rope_dim", self.latent_rope_dim, minimum=0)


class LatentAttention(Attention):
    """``mla``: multi-head latent attention; keys/values rebuilt from a cached latent (or, in
    the absorbed form, attended in latent space). See the module docstring."""

    kind = "mla"
    config_class = MLAConfig
    supports_key_padding_mask = True
    has_absorbed_form = True
    uses_head_rotary = False  # RoPE on the decoupled part and the latent blocks only
    shares_one_latent = True

    def _build(self, qkv_bias: bool) -> None:
        config, hd, heads, dim = self.config, self.head_dim, self.num_heads, self.dim
        rope_dim = config.rope_dim
        if rope_dim is None:
            rope_dim = max(2, (hd // 2) // 2 * 2) if self.rope else 0
        if rope_dim and (not self.rope or rope_dim % 2):
            raise LeanError(f"Attention: rope_dim={rope_dim} with rope={self.rope}; the decoupled "
                            "RoPE part needs rope=True and an even size (or rope_dim=0)")
        latent_rope_dim = config.latent_rope_dim
        if latent_rope_dim and (not self.rope or hd % 2 or latent_rope_dim % hd
                                or latent_rope_dim > config.kv_lora_rank):
            raise LeanError(f"Attention: latent_rope_dim={latent_rope_dim}; expected a multiple "
                            f"of head_dim={hd} (even) at most kv_lora_rank={config.kv_lora_rank}, "
                            "with rope=True")
        self.config = dataclasses.replace(config, rope_dim=rope_dim)  # the resolved default
        self.kv_lora_rank = config.kv_lora_rank
        self.rope_dim = rope_dim
        self.latent_rope_dim = latent_rope_dim
        self.q_proj = nn.Linear(dim, heads * (hd + rope_dim), bias=qkv_bias)
        self.kv_down = nn.Linear(dim, self.kv_lora_rank, bias=qkv_bias)        # W_DKV
        self.k_up = nn.Linear(self.kv_lora_rank, heads * hd, bias=False)      # W_UK
        self.v_up = nn.Linear(self.kv_lora_rank, heads * hd, bias=False)      # W_UV
        self.k_rope_proj = nn.Linear(dim, rope_dim, bias=qkv_bias) if rope_dim else None
        self.rope_rotary = RotaryEmbedding(rope_dim, self.rope_base) if rope_dim else None
        self.latent_rotary = RotaryEmbedding(hd, self.rope_base) if latent_rope_dim else None

    @property
    def scale(self) -> float:
        """``1 / sqrt(head_dim + rope_dim)``: queries and keys carry the RoPE part too."""
        return (self.head_dim + self.rope_dim) ** -0.5

    def cached_kv_layout(self) -> tuple[int, int, int | None]:
        """One shared row ``[c, k_R]`` of ``kv_lora_rank + rope_dim`` per token, no values:
        ``(kv_lora_rank + rope_dim) * itemsize`` bytes."""
        return 1, self.kv_lora_rank + self.rope_dim, None

    def _rotate_latent(self, latent: Tensor, positions: Tensor) -> Tensor:
        """Rotate the first ``latent_rope_dim`` channels of ``latent (batch, seq, d_c)`` in blocks
        of ``head_dim`` (each block is one GQA key head in a converted layer)."""
        if not self.latent_rope_dim:
            return latent
        batch, seq, _ = latent.shape
        blocks = self.latent_rope_dim // self.head_dim
        rotated = latent[..., : self.latent_rope_dim].reshape(batch, seq, blocks, self.head_dim)
        rotated = self.latent_rotary(rotated.transpose(1, 2), positions).transpose(1, 2)
        return torch.cat((rotated.reshape(batch, seq, -1), latent[..., self.latent_rope_dim:]),
                         dim=-1)

    def mla_latent(self, x: Tensor, positions: Tensor) -> Tensor:
        """What MLA caches per token: ``(batch, 1, seq, kv_lora_rank + rope_dim)``, the latent
        ``c = x W_DKV`` (its first ``latent_rope_dim`` channels rotated) followed by the shared
        rotated RoPE key ``RoPE(x W_KR)``."""
        latent = self._rotate_latent(self.kv_down(x), positions).unsqueeze(1)
        if self.rope_dim:
            rope_key = self.rope_rotary(self.k_rope_proj(x).unsqueeze(1), positions)
            latent = torch.cat((latent, rope_key), dim=-1)
        return latent

    def _mla_queries(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """``(q_nope (batch, heads, seq, head_dim), q_rope (batch, heads, seq, rope_dim))``."""
        q = split_heads(self.q_proj(x), self.num_heads)
        q_nope, q_rope = q.split((self.head_dim, self.rope_dim), dim=-1)
        if self.rope_dim:
            q_rope = self.rope_rotary(q_rope, positions)
        if self.latent_rope_dim:
            q_nope = self.latent_rotary(q_nope, positions)
        return q_nope, q_rope

    def _mla_absorbed_query(self, q_nope: Tensor, q_rope: Tensor) -> Tensor:
        """``[q_nope_h W_UK_h^T, q_rope_h]``: a query that scores the cached latent directly."""
        w_uk = self.k_up.weight.view(self.num_heads, self.head_dim, self.kv_lora_rank)
        return torch.cat((torch.einsum("bhnd,hdc->bhnc", q_nope, w_uk), q_rope), dim=-1)

    def _mla_unabsorbed(self, q_nope, q_rope, latent, causal, key_padding_mask) -> Tensor:
        """Rebuild per-head K = [c W_UK, k_rope] and V = c W_UV from the latent and attend."""
        c = latent[:, 0, :, : self.kv_lora_rank]
        keys = split_heads(self.k_up(c), self.num_heads)
        if self.rope_dim:
            rope_key = latent[:, :, :, self.kv_lora_rank:]
            keys = torch.cat((keys, rope_key.expand(-1, self.num_heads, -1, -1)), dim=-1)
        values = split_heads(self.v_up(c), self.num_heads)
        q = torch.cat((q_nope, q_rope), dim=-1)
        return attention(q, keys, values, causal=causal, key_padding_mask=key_padding_mask,
                         scale=self.scale)

    def _mla_absorbed(self, q_nope, q_rope, latent, causal, key_padding_mask) -> Tensor:
        """Attend in latent space: MQA with one KV head whose keys are ``[c, k_R]``; W_UV is
        applied to the (per-head) result.

        The values are the whole cached row ``[c, k_R]`` and the last ``rope_dim`` output
        channels are dropped: exactly ``softmax(.) c``, at ``rope_dim / kv_lora_rank`` extra AV
        work, but with keys and values of one size, so torch's fused SDPA kernel applies (a
        value size differing from the key size sends SDPA to its math path). When no causal
        mask is needed (one new token, or ``causal=False``) the heads are folded into the query
        axis, ``(batch, 1, heads * n, d_c + d_R)``: single-head attention over the latent, with
        no per-head copy of it.
        """
        q = self._mla_absorbed_query(q_nope, q_rope)
        batch, heads, n, width = q.shape
        if n == 1 or not causal:
            folded = attention(q.reshape(batch, 1, heads * n, width), latent, latent,
                               key_padding_mask=key_padding_mask, scale=self.scale)
            out = folded.view(batch, heads, n, width)
        else:
            out = attention(q, latent, latent, causal=True,
                            key_padding_mask=key_padding_mask, scale=self.scale)
        w_uv = self.v_up.weight.view(self.num_heads, self.value_dim, self.kv_lora_rank)
        return torch.einsum("bhnc,hvc->bhnv", out[..., : self.kv_lora_rank], w_uv)

    def _heads(self, x, positions, cache, entry, key_padding_mask, absorb) -> Tensor:
        q_nope, q_rope = self._mla_queries(x, positions)
        latent = self.mla_latent(x, positions)
        absorb = (entry is not None) if absorb is None else absorb
        run = self._mla_absorbed if absorb else self._mla_unabsorbed
        if entry is None:
            return run(q_nope, q_rope, latent, self.causal, key_padding_mask)

        def attend(keys: Tensor, values: Tensor | None, key_positions: Tensor) -> Tensor:
            return run(q_nope, q_rope, keys, True, None)

        def votes_query() -> Tensor:
            return self._mla_absorbed_query(q_nope, q_rope)

        # the latent is both key and value (values=None: the buffer stores it once)
        return self._write_and_attend(cache, entry, latent, None, positions, attend,
                                      votes_query)


@torch.no_grad()
def gqa_to_mla(layer: Attention) -> LatentAttention:
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
    config = MLAConfig(kv_lora_rank=2 * kv_heads * hd, rope_dim=0,
                       latent_rope_dim=kv_heads * hd if layer.rope else 0)
    mla = LatentAttention(
        layer.dim, heads, head_dim=hd, causal=layer.causal, config=config, rope=layer.rope,
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


def fold_mla_weights(layer: LatentAttention) -> FoldedMLA:
    """Multiply W_UK into the query projection and W_UV into the output projection.

    The absorbed path of :class:`Attention` applies ``W_UK_h`` to ``q_nope_h`` and ``W_UV_h`` to
    the latent output at run time instead: the same products in another order, and cheaper
    whenever ``d_c`` exceeds ``head_dim`` (per token ``dim * heads * d_c`` MACs for the folded
    query vs ``dim * heads * head_dim + heads * head_dim * d_c`` unfolded). Not defined for a
    layer with ``latent_rope_dim > 0`` (a converted GQA layer), where RoPE sits between W_Q and
    W_UK.
    """
    if not isinstance(layer, LatentAttention):
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
