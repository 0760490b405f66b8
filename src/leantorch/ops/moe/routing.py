"""Routers and their losses, as functions on router logits.

A router turns logits ``(tokens, experts)`` into *assignments*: flat lists of (token, expert,
gate) triples, ``A`` of them. Top-k routing gives every token ``k`` assignments; expert-choice
routing gives every expert ``capacity`` of them. The assignments come out in *priority order*
(the order in which a capacity limit keeps them, see :func:`priority_order`), so the dispatcher
only has to sort them stably by expert.

Scores and gates:

* ``score="softmax"``: ``p = softmax(logits)`` over the experts (Switch, Mixtral);
  ``score="sigmoid"``: ``p = sigmoid(logits)`` per expert (DeepSeek-V3).
* the top-k experts are chosen on ``p + selection_bias`` (the auxiliary-loss-free balancing of
  Wang et al. 2024 biases the choice, never the gate value);
* ``gates="probs"``: the chosen ``p`` as they are; ``"renorm"``: divided by their sum over the
  k chosen experts (Mixtral); ``"unit"``: exactly 1 (each chosen expert's output is added as is,
  what an exactly split dense FFN needs), with the gradient of ``p`` passed straight through
  (``1 + (p - p.detach())``) so the router still learns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from leantorch.errors import LeanError, describe
from leantorch.validate import one_of, positive_int, ratio

__all__ = [
    "GATE_MODES",
    "PRIORITIES",
    "SCORES",
    "Routing",
    "balance_loss",
    "capacity_for",
    "expert_choice_routing",
    "priority_order",
    "router_scores",
    "topk_routing",
    "z_loss",
]

SCORES = ("softmax", "sigmoid")
GATE_MODES = ("probs", "renorm", "unit")
PRIORITIES = ("position", "score")


@dataclass
class Routing:
    """Assignments of tokens to experts, flat and in priority order.

    ``token_index (A,)``, ``expert_index (A,)``: int64; ``gates (A,)``: the weight of each
    assignment's expert output (differentiable); ``choice (A,)``: 0 for a token's first choice,
    1 for its second... (expert choice: the rank of the token in its expert's pick);
    ``probs (tokens, experts)``: the router scores ``p`` the gates came from.
    """

    token_index: Tensor
    expert_index: Tensor
    gates: Tensor
    choice: Tensor
    probs: Tensor

    @property
    def num_assignments(self) -> int:
        """A: the number of (token, expert) assignments."""
        return self.token_index.numel()


def _check_logits(logits: Tensor) -> None:
    if not isinstance(logits, Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        raise LeanError(f"router logits must be a floating (tokens, experts) tensor, got "
                        f"{describe(getattr(logits, 'shape', logits))}")


def router_scores(logits: Tensor, score: str = "softmax") -> Tensor:
    """``p``: softmax over the experts or an independent sigmoid per expert, computed in at
    least float32 (routing decisions should not depend on a bf16 rounding). ``logits:
    (tokens, experts)`` -> ``(tokens, experts)``."""
    _check_logits(logits)
    upcast = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    if score == "softmax":
        return torch.softmax(upcast, dim=-1)
    if score == "sigmoid":
        return torch.sigmoid(upcast)
    raise LeanError(f"score must be one of {', '.join(SCORES)}, got {score!r}")


def topk_routing(
    logits: Tensor,
    k: int,
    *,
    score: str = "softmax",
    gates: str = "renorm",
    selection_bias: Tensor | None = None,
    priority: str = "position",
) -> Routing:
    """Each token picks its ``k`` best experts.

    Args:
        logits: ``(tokens, experts)`` router logits.
        k: experts per token, ``1 <= k <= experts``.
        score: ``"softmax"`` or ``"sigmoid"`` (see the module docstring).
        gates: ``"probs"``, ``"renorm"`` or ``"unit"``.
        selection_bias: ``(experts,)`` added to the scores for choosing only.
        priority: order of the returned assignments (see :func:`priority_order`).

    Returns:
        A :class:`Routing` with ``tokens * k`` assignments.
    """
    _check_logits(logits)
    tokens, experts = logits.shape
    positive_int("topk_routing", "k", k)
    if k > experts:
        raise LeanError(f"topk_routing: k={k}; expected an int in [1, {experts}] (the number "
                        "of experts)")
    one_of("topk_routing", "gates", gates, GATE_MODES)
    probs = router_scores(logits, score)
    if selection_bias is not None:
        if selection_bias.shape != (experts,):
            raise LeanError(f"selection_bias must have shape ({experts},), got "
                            f"{tuple(selection_bias.shape)}")
        with torch.no_grad():
            _, chosen = torch.topk(probs + selection_bias, k, dim=-1)
        top = probs.gather(1, chosen)
    else:
        top, chosen = torch.topk(probs, k, dim=-1)
    if gates == "renorm":
        top = top / top.sum(dim=-1, keepdim=True)
    elif gates == "unit":
        # exactly 1.0 with the gradient of p passed straight through; not p / p.detach(),
        # which is 0 / 0 where a probability underflows
        top = 1.0 + (top - top.detach())
    # choice-major flattening: every first choice (in token order), then every second choice...
    token_index = torch.arange(tokens, device=logits.device).repeat(k)
    choice = torch.arange(k, device=logits.device).repeat_interleave(tokens)
    routing = Routing(token_index=token_index, expert_index=chosen.t().reshape(-1),
                      gates=top.t().reshape(-1), choice=choice, probs=probs)
    return priority_order(routing, priority)


def priority_order(routing: Routing, priority: str = "position") -> Routing:
    """Put the assignments in the order a capacity limit keeps them.

    * ``"position"`` (GShard / Switch): all first choices before any second choice, and within
      one choice rank earlier tokens first. A token's first choice is kept or dropped by the
      earlier tokens alone.
    * ``"score"`` (batch-prioritised routing, V-MoE): within one choice rank, larger gates
      first (ties: earlier token first).
    """
    if priority == "position":
        return routing
    if priority != "score":
        raise LeanError(f"priority must be one of {', '.join(PRIORITIES)}, got {priority!r}")
    # one stable sort on (choice, -gate): sort by -gate first, then stably by choice
    by_gate = torch.argsort(-routing.gates.detach(), stable=True)
    by_choice = torch.argsort(routing.choice[by_gate], stable=True)
    order = by_gate[by_choice]
    return Routing(routing.token_index[order], routing.expert_index[order],
                   routing.gates[order], routing.choice[order], routing.probs)


def expert_choice_routing(logits: Tensor, capacity: int) -> Routing:
    """Expert-choice routing (Zhou et al. 2022): every expert takes the ``capacity`` tokens
    with the highest softmax score for it, so loads are perfectly even and a token may get any
    number of experts (including none). The gate is the token's softmax score for the expert.

    Not causal: a token's experts depend on the other tokens of the batch, so it does not fit
    autoregressive decoding.

    ``logits: (tokens, experts)``; ``capacity``: tokens per expert, ``1..tokens``.
    """
    _check_logits(logits)
    tokens, experts = logits.shape
    positive_int("expert_choice_routing", "capacity", capacity)
    if capacity > tokens:
        raise LeanError(f"expert_choice_routing: capacity={capacity}; expected an int in "
                        f"[1, {tokens}] (the number of tokens)")
    probs = router_scores(logits, "softmax")
    top, token_choice = torch.topk(probs.t(), capacity, dim=-1)  # (experts, capacity)
    expert_index = torch.arange(experts, device=logits.device).repeat_interleave(capacity)
    choice = torch.arange(capacity, device=logits.device).repeat(experts)
    return Routing(token_index=token_choice.reshape(-1), expert_index=expert_index,
                   gates=top.reshape(-1), choice=choice, probs=probs)


def balance_loss(
    probs: Tensor,
    expert_counts: Tensor,
    weights: Tensor | None = None,
) -> Tensor:
    """Load-balancing loss ``N * sum_i w_i * f_i * P_i`` (Switch Transformer).

    ``f_i = expert_counts_i / sum(expert_counts)`` is the fraction of assignments expert ``i``
    received (not differentiable: pass counts accumulated over micro-batches and ranks for the
    global-batch variant), ``P_i`` the mean router probability of expert ``i`` over this
    batch's tokens, ``N`` the number of experts, ``w`` optional per-expert weights (MoE++
    weights its zero-computation experts by tau). Equals 1 when both are uniform.

    ``probs: (tokens, experts)``; ``expert_counts: (experts,)``.
    """
    experts = probs.shape[-1]
    if expert_counts.shape != (experts,):
        raise LeanError(f"expert_counts must have shape ({experts},), got "
                        f"{tuple(expert_counts.shape)}")
    counts = expert_counts.detach().to(probs.dtype)
    fraction = counts / counts.sum().clamp_min(1)
    mean_prob = probs.mean(dim=0)
    per_expert = fraction * mean_prob
    if weights is not None:
        per_expert = per_expert * weights.to(probs.dtype)
    return experts * per_expert.sum()


def z_loss(logits: Tensor) -> Tensor:
    """Router z-loss (ST-MoE): ``mean over tokens of logsumexp(logits)^2``; keeps logits small
    so the softmax stays well conditioned. ``logits: (tokens, experts)`` -> scalar."""
    _check_logits(logits)
    return torch.logsumexp(logits.float() if logits.dtype != torch.float64 else logits,
                           dim=-1).square().mean()


def capacity_for(tokens: int, *, num_experts: int, k: float,
                 capacity_factor: float | None) -> int | None:
    """``C = ceil(capacity_factor * k * tokens / num_experts)`` (None: dropless). The expert
    sizes are keyword-only, so ``k`` and ``num_experts`` cannot be swapped unnoticed."""
    if capacity_factor is None:
        return None
    ratio("capacity_for", "capacity_factor", capacity_factor, include_low=False,
          high=float("inf"))
    return max(1, math.ceil(capacity_factor * k * tokens / num_experts))
