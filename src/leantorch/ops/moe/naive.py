"""The plainest correct mixture-of-experts, written to be read: one Python loop over the
(token, expert) assignments, one expert call per assignment. Every fast path in
:mod:`leantorch.ops.moe.dispatch` is tested against these functions (values and gradients).
"""

from __future__ import annotations

import torch
from torch import Tensor

from leantorch.ops.moe.dispatch import activation_fn

__all__ = [
    "balance_loss_naive",
    "expert_naive",
    "kept_by_capacity_naive",
    "moe_naive",
    "topk_naive",
]


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
    act = activation_fn(activation)
    h = x @ w_in[e]
    if b_in is not None:
        h = h + b_in[e]
    if gated:
        half = h.shape[-1] // 2
        h = act(h[:half]) * h[half:]
    else:
        h = act(h)
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
