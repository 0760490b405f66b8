"""The router: logits from the token (plus, optionally, learned noise and the previous layer's
router logits), then top-k or expert-choice assignments (:mod:`leantorch.ops.moe.routing`)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leantorch.errors import LeanError
from leantorch.ops.moe.routing import (
    GATE_MODES,
    PRIORITIES,
    SCORES,
    Routing,
    expert_choice_routing,
    topk_routing,
)
from leantorch.serialize import register_module
from leantorch.validate import one_of, positive_int, ratio

__all__ = ["ROUTINGS", "Router"]

ROUTINGS = ("topk", "expert_choice")


@register_module(name="leantorch.Router")
class Router(nn.Module):
    """Routes tokens to experts.

    Args:
        dim: token width.
        num_experts: experts to route over (MoE++'s zero-computation experts included).
        k: experts per token (top-k), or the average experts per token that sets the
            expert-choice capacity.
        score: ``"softmax"`` or ``"sigmoid"``.
        gates: ``"probs"``, ``"renorm"`` (the k gates sum to 1) or ``"unit"``.
        routing: ``"topk"`` or ``"expert_choice"``.
        noisy: noisy top-k gating (Shazeer et al. 2017): in training, add
            ``N(0, 1) * softplus(x @ w_noise)`` to the logits.
        priority: which assignments a capacity limit keeps first: ``"position"`` or ``"score"``.
        prev_experts: number of experts of the previous MoE layer whose router logits are fed
            forward (MoE++ gating residual): ``logits = x W^T + prev_logits W_res^T``;
            ``W_res`` starts at zero so the router starts as the plain one. 0: off.
        bias: a bias on the router logits.
        balance_bias_rate: auxiliary-loss-free balancing (Wang et al. 2024): a per-expert bias
            added to the scores for choosing experts only; after every training forward each
            bias moves by ``rate * sign(mean load - load)``. 0: off.
    """

    def __init__(self, dim: int, num_experts: int, k: int = 2, *, score: str = "softmax",
                 gates: str = "renorm", routing: str = "topk", noisy: bool = False,
                 priority: str = "position", prev_experts: int = 0, bias: bool = False,
                 balance_bias_rate: float = 0.0) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("num_experts", num_experts), ("k", k)):
            positive_int("Router", name, value)
        if k > num_experts:
            raise LeanError(f"Router: k={k} is more than num_experts={num_experts}")
        for name, value, allowed in (("score", score, SCORES), ("gates", gates, GATE_MODES),
                                     ("routing", routing, ROUTINGS),
                                     ("priority", priority, PRIORITIES)):
            one_of("Router", name, value, allowed)
        if routing == "expert_choice" and score != "softmax":
            raise LeanError("Router: expert_choice routing scores with softmax; got "
                            f"score={score!r}")
        ratio("Router", "balance_bias_rate", balance_bias_rate, high=float("inf"))
        positive_int("Router", "prev_experts", prev_experts, minimum=0)
        self.dim, self.num_experts, self.k = dim, num_experts, k
        self.score, self.gates, self.routing, self.priority = score, gates, routing, priority
        self.noisy, self.prev_experts = bool(noisy), prev_experts
        self.balance_bias_rate = float(balance_bias_rate)
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        self.bias = nn.Parameter(torch.zeros(num_experts)) if bias else None
        # Shazeer et al. start the noise weights at zero (noise std softplus(0) = 0.69)
        self.w_noise = nn.Parameter(torch.zeros(num_experts, dim)) if noisy else None
        self.w_residual = (nn.Parameter(torch.zeros(num_experts, prev_experts))
                           if prev_experts else None)
        if balance_bias_rate > 0:
            self.register_buffer("expert_bias", torch.zeros(num_experts))
        else:
            self.expert_bias = None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default

    def spec(self) -> dict[str, Any]:
        """Constructor arguments: ``dim``, ``num_experts``, ``k``, ``score``, ``gates``,
        ``routing``, ``noisy``, ``priority``, ``prev_experts``, ``bias`` (bool) and
        ``balance_bias_rate``."""
        return {"dim": self.dim, "num_experts": self.num_experts, "k": self.k,
                "score": self.score, "gates": self.gates, "routing": self.routing,
                "noisy": self.noisy, "priority": self.priority,
                "prev_experts": self.prev_experts, "bias": self.bias is not None,
                "balance_bias_rate": self.balance_bias_rate}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.spec().items())

    def logits(self, x: Tensor, prev_logits: Tensor | None = None) -> Tensor:
        """``x (tokens, dim)``, ``prev_logits (tokens, prev_experts)`` -> ``(tokens, E)``."""
        logits = F.linear(x, self.weight, self.bias)
        if prev_logits is not None:
            if self.w_residual is None:
                raise LeanError("Router: prev_router_logits given but this router has no "
                                "gating residual; build the layer with prev_experts=<number of "
                                "experts of the previous layer>")
            if prev_logits.shape != (x.shape[0], self.prev_experts):
                raise LeanError(f"Router: prev_router_logits must have shape "
                                f"({x.shape[0]}, {self.prev_experts}), got "
                                f"{tuple(prev_logits.shape)}")
            logits = logits + F.linear(prev_logits.to(logits.dtype), self.w_residual)
        if self.noisy and self.training:
            std = F.softplus(F.linear(x, self.w_noise))
            logits = logits + torch.randn_like(logits) * std
        return logits

    def route(self, logits: Tensor, capacity: int | None = None) -> Routing:
        """Assignments for ``logits (tokens, E)``; ``capacity`` is the expert-choice pick."""
        if self.routing == "expert_choice":
            tokens = logits.shape[0]
            pick = capacity if capacity is not None else math.ceil(self.k * tokens /
                                                                  self.num_experts)
            return expert_choice_routing(logits, min(max(pick, 1), tokens))
        return topk_routing(logits, self.k, score=self.score, gates=self.gates,
                            selection_bias=self.expert_bias, priority=self.priority)

    @torch.no_grad()
    def update_expert_bias(self, load: Tensor) -> None:
        """Auxiliary-loss-free step: ``bias_i += rate * sign(mean(load) - load_i)``."""
        if self.expert_bias is None:
            return
        load = load.to(self.expert_bias.dtype)
        self.expert_bias += self.balance_bias_rate * torch.sign(load.mean() - load)
