"""The plainest correct mixture-of-experts, written to be read: one Python loop over the
(token, expert) assignments, one expert call per assignment. Every fast path in
:mod:`leantorch.ops.moe.dispatch` is tested against these functions (values and gradients).

The reference imports nothing from the fast path, its activations included (written out from
their formulas below), so a bug there cannot hide in both.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from leantorch.errors import LeanError

__all__ = [
    "activation_naive",
    "balance_loss_naive",
    "expert_naive",
    "kept_by_capacity_naive",
    "moe_naive",
    "topk_naive",
]


def activation_naive(name: str, x: Tensor) -> Tensor:
    """The element-wise activation ``name`` from its formula: ``relu = max(x, 0)``,
    ``gelu = x * Phi(x)`` (``Phi`` the standard normal CDF, via ``erf``), ``gelu_tanh = x/2 *
    (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))``, ``silu = x / (1 + exp(-x))``."""
    if name == "relu":
        return torch.where(x > 0, x, torch.zeros_like(x))
    if name == "gelu":
        return x * 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    if name == "gelu_tanh":
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    if name == "silu":
        return x / (1 + torch.exp(-x))
    raise LeanError(f"activation_naive: name={name!r}; expected one of 'relu', 'gelu', "
                    "'gelu_tanh', 'silu'")


def topk_naive(probs: Tensor, k: int, renormalize: bool) -> tuple[Tensor, Tensor]:
    """Per token, the ``k`` experts with the largest score and their gates.
    ``probs: (tokens, experts)`` -> experts ``(tokens, k)``, gates ``(tokens, k)``."""
    experts, gates = [], []
    for row in probs:
        order = torch.argsort(row, descending=True)[:k]
        chosen = row[order]
        if renormalize:
            chosen = chosen / chosen.sum()
        experts.append(order)
        gates.append(chosen)
    return torch.stack(experts), torch.stack(gates)


def expert_naive(
    x: Tensor,
    e: int,
    w_in: Tensor,
    w_out: Tensor,
    b_in: Tensor | None,
    b_out: Tensor | None,
    activation: str,
    gated: bool,
) -> Tensor:
    """Expert ``e`` on one token ``x (dim,)`` -> ``(dim,)``."""
    h = x @ w_in[e]
    if b_in is not None:
        h = h + b_in[e]
    if gated:
        half = h.shape[-1] // 2
        h = activation_naive(activation, h[:half]) * h[half:]
    else:
        h = activation_naive(activation, h)
    y = h @ w_out[e]
    if b_out is not None:
        y = y + b_out[e]
    return y


def kept_by_capacity_naive(expert_index: list[int], capacity: int | None,
                           capped_experts: int | None = None) -> list[bool]:
    """Walk the assignments in priority order; an expert keeps its first ``capacity``."""
    seen: dict[int, int] = {}
    kept = []
    for e in expert_index:
        limited = capacity is not None and (capped_experts is None or e < capped_experts)
        kept.append(not limited or seen.get(e, 0) < capacity)
        seen[e] = seen.get(e, 0) + 1
    return kept


def moe_naive(
    x: Tensor,
    token_index: Tensor,
    expert_index: Tensor,
    gates: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    b_in: Tensor | None = None,
    b_out: Tensor | None = None,
    *,
    activation: str = "silu",
    gated: bool = True,
    capacity: int | None = None,
) -> Tensor:
    """``out[t] = sum over kept assignments (t, e, g) of g * expert_e(x[t])``.

    ``x (tokens, dim)``; ``token_index``, ``expert_index``, ``gates``: ``(A,)`` in priority
    order; weights as in :func:`leantorch.ops.moe.dispatch.expert_mlp` -> ``(tokens, dim)``.
    """
    kept = kept_by_capacity_naive(expert_index.tolist(), capacity)
    rows = [torch.zeros_like(x[0]) for _ in range(x.shape[0])]
    for a in range(token_index.numel()):
        if not kept[a]:
            continue
        t, e = int(token_index[a]), int(expert_index[a])
        y = expert_naive(x[t], e, w_in, w_out, b_in, b_out, activation, gated)
        rows[t] = rows[t] + gates[a] * y
    return torch.stack(rows)


def balance_loss_naive(probs: Tensor, expert_index: list[int]) -> Tensor:
    """``N * sum_i f_i * P_i`` with the fraction ``f_i`` counted by hand."""
    experts = probs.shape[1]
    total = 0.0
    for i in range(experts):
        f_i = sum(1 for e in expert_index if e == i) / len(expert_index)
        p_i = probs[:, i].mean()
        total = total + f_i * p_i
    return experts * total
