"""Mixture-of-experts kernels in plain PyTorch: routing (top-k, expert choice, losses), sort-based
dispatch with a grouped matmul, and the readable reference in :mod:`.naive`."""

from leantorch.ops.moe.dispatch import (
    ACTIVATIONS,
    BACKENDS,
    DispatchPlan,
    activation_fn,
    combine,
    expert_mlp,
    grouped_matmul,
    grouped_mm_supported,
    plan_dispatch,
)
from leantorch.ops.moe.routing import (
    GATE_MODES,
    SCORES,
    Routing,
    balance_loss,
    capacity_for,
    expert_choice_routing,
    priority_order,
    router_scores,
    topk_routing,
    z_loss,
)

__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "GATE_MODES",
    "SCORES",
    "DispatchPlan",
    "Routing",
    "activation_fn",
    "balance_loss",
    "capacity_for",
    "combine",
    "expert_choice_routing",
    "expert_mlp",
    "grouped_matmul",
    "grouped_mm_supported",
    "plan_dispatch",
    "priority_order",
    "router_scores",
    "topk_routing",
    "z_loss",
]
