"""Expert weights stored stacked, and the dense FFN they generalise.

``StackedExperts`` holds ``E`` FFN experts as three-dimensional tensors (``w_in (E, dim,
hidden)``, ``2 * hidden`` when gated, and ``w_out (E, hidden, dim)``) and runs them on rows that
are already grouped by expert (:mod:`leantorch.ops.moe.dispatch`). ``FeedForward`` is the same
FFN with one expert and no routing: the shared expert of a layer, and the dense limit the routed
layer is measured against.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from leantorch.ops.moe.dispatch import BACKENDS, activation_fn, expert_mlp
from leantorch.serialize import register_module
from leantorch.validate import one_of, positive_int

__all__ = ["FeedForward", "StackedExperts"]


@register_module(name="leantorch.StackedExperts")
class StackedExperts(nn.Module):
    """``num_experts`` FFN experts in stacked tensors.

    The sizes are keyword-only (``StackedExperts(dim=..., hidden=..., num_experts=...)``), in
    the order every MoE constructor uses: ``dim``, ``hidden``, then ``num_experts``.

    Args:
        dim: model width (expert input and output).
        hidden: each expert's hidden width.
        num_experts: E.
        activation: ``"silu"``, ``"gelu"``, ``"gelu_tanh"`` or ``"relu"``.
        gated: GLU expert ``act(x W_gate) * (x W_up)`` (SwiGLU with silu, GeGLU with gelu).
        bias: biases on both projections (BERT / GPT-2 style FFNs have them); ``"in"``: on
            the input projection only (an exactly split FFN: its output bias is shared).
        backend: grouped-matmul backend, ``"auto"``, ``"loop"`` or ``"grouped_mm"``.

    ``forward(rows, counts)``: ``rows (S, dim)`` grouped by expert, ``counts (E,)`` rows per
    expert -> ``(S, dim)``.
    """

    def __init__(self, *, dim: int, hidden: int, num_experts: int, activation: str = "silu",
                 gated: bool = True, bias: bool | str = False, backend: str = "auto") -> None:
        super().__init__()
        self.dim = positive_int("StackedExperts", "dim", dim)
        self.hidden = positive_int("StackedExperts", "hidden", hidden)
        self.num_experts = positive_int("StackedExperts", "num_experts", num_experts)
        activation_fn(activation)
        one_of("StackedExperts", "backend", backend, BACKENDS)
        one_of("StackedExperts", "bias", bias, (True, False, "in"))
        self.activation, self.gated, self.backend = activation, bool(gated), backend
        self.bias = bias
        width = hidden * (2 if gated else 1)
        self.w_in = nn.Parameter(torch.empty(num_experts, dim, width))
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.b_in = nn.Parameter(torch.empty(num_experts, width)) if bias else None
        self.b_out = nn.Parameter(torch.empty(num_experts, dim)) if bias is True else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default: uniform in +-1/sqrt(fan_in), per expert
        """Re-initialise every expert as ``nn.Linear`` does: weights and biases uniform in
        ``+-1/sqrt(fan_in)``."""
        with torch.no_grad():
            for weight, fan_in in ((self.w_in, self.dim), (self.w_out, self.hidden)):
                weight.uniform_(-1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
            for b, fan_in in ((self.b_in, self.dim), (self.b_out, self.hidden)):
                if b is not None:
                    b.uniform_(-1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))

    def spec(self) -> dict[str, Any]:
        """Constructor arguments: ``dim``, ``hidden``, ``num_experts``, ``activation``, ``gated``,
        ``bias`` (True, False or ``"in"``) and ``backend``."""
        return {"dim": self.dim, "hidden": self.hidden, "num_experts": self.num_experts,
                "activation": self.activation, "gated": self.gated, "bias": self.bias,
                "backend": self.backend}

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, hidden={self.hidden}, num_experts={self.num_experts}, "
                f"activation={self.activation}, gated={self.gated}, bias={self.bias}, "
                f"backend={self.backend}")

    @property
    def params_per_expert(self) -> int:
        """Parameters of one expert: its two weight matrices
        and its biases."""
        per = self.w_in[0].numel() + self.w_out[0].numel()
        for b in (self.b_in, self.b_out):
            if b is not None:
                per += b.shape[1]
        return per

    def forward(self, rows: Tensor, counts: Tensor,
                counts_list: list[int] | None = None) -> Tensor:
        """``rows (S, dim)`` grouped by expert, ``counts (E,)`` rows per expert (``counts_list``:
        the same as Python ints, saves a device sync) -> ``(S, dim)``, each row through its
        expert's FFN."""
        return expert_mlp(rows, counts, self.w_in, self.w_out, self.b_in, self.b_out,
                          activation=self.activation, gated=self.gated, backend=self.backend,
                          counts_list=counts_list)

    def expert(self, e: int) -> FeedForward:
        """Expert ``e`` as a dense :class:`FeedForward` (a copy; a missing output bias is 0)."""
        ffn = FeedForward(self.dim, self.hidden, self.activation, self.gated,
                          bias=self.b_in is not None)
        ffn = ffn.to(device=self.w_in.device, dtype=self.w_in.dtype)
        with torch.no_grad():
            ffn.w_in.copy_(self.w_in[e])
            ffn.w_out.copy_(self.w_out[e])
            if self.b_in is not None:
                ffn.b_in.copy_(self.b_in[e])
                ffn.b_out.copy_(self.b_out[e] if self.b_out is not None else 0)
        return ffn


@register_module(name="leantorch.FeedForward")
class FeedForward(nn.Module):
    """A dense FFN ``act(x @ w_in + b_in) @ w_out + b_out`` (gated: ``act(x W_gate) *
    (x W_up)``), weights laid out like one expert of :class:`StackedExperts`.
    ``x (..., dim)`` -> ``(..., dim)``."""

    def __init__(self, dim: int, hidden: int, activation: str = "silu", gated: bool = True,
                 bias: bool = False) -> None:
        super().__init__()
        self.dim = positive_int("FeedForward", "dim", dim)
        self.hidden = positive_int("FeedForward", "hidden", hidden)
        self.act = activation_fn(activation)
        self.activation, self.gated = activation, bool(gated)
        width = hidden * (2 if gated else 1)
        self.w_in = nn.Parameter(torch.empty(dim, width))
        self.w_out = nn.Parameter(torch.empty(hidden, dim))
        self.b_in = nn.Parameter(torch.empty(width)) if bias else None
        self.b_out = nn.Parameter(torch.empty(dim)) if bias else None
        with torch.no_grad():
            self.w_in.uniform_(-1 / math.sqrt(dim), 1 / math.sqrt(dim))
            self.w_out.uniform_(-1 / math.sqrt(hidden), 1 / math.sqrt(hidden))
            if bias:
                self.b_in.uniform_(-1 / math.sqrt(dim), 1 / math.sqrt(dim))
                self.b_out.uniform_(-1 / math.sqrt(hidden), 1 / math.sqrt(hidden))

    def spec(self) -> dict[str, Any]:
        """Constructor arguments: ``dim``, ``hidden``, ``activation``, ``gated`` and ``bias``."""
        return {"dim": self.dim, "hidden": self.hidden, "activation": self.activation,
                "gated": self.gated, "bias": self.b_in is not None}

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, hidden={self.hidden}, activation={self.activation}, "
                f"gated={self.gated}, bias={self.b_in is not None}")

    def forward(self, x: Tensor) -> Tensor:
        """``x (..., dim)`` -> ``(..., dim)``."""
        h = x @ self.w_in if self.b_in is None else torch.addmm(
            self.b_in, x.reshape(-1, self.dim), self.w_in).reshape(*x.shape[:-1], -1)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        if self.b_out is None:
            return h @ self.w_out
        return torch.addmm(self.b_out, h.reshape(-1, self.hidden),
                           self.w_out).reshape(*x.shape[:-1], self.dim)
