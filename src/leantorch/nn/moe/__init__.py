"""Mixture-of-experts layers: :class:`MoE` (routed FFN experts with capacity or dropless
dispatch, shared experts, MoE++ zero-computation experts, balancing losses), its parts
(:class:`Router`, :class:`StackedExperts`, :class:`FeedForward`) and Mixtral interop."""

from leantorch.nn.moe.experts import FeedForward, StackedExperts
from leantorch.nn.moe.interop import convert_mixtral, from_mixtral, to_mixtral
from leantorch.nn.moe.layer import BALANCE_MODES, MoE, MoEStats, moe_aux_loss, moe_layers
from leantorch.nn.moe.router import ROUTINGS, Router

__all__ = [
    "BALANCE_MODES",
    "ROUTINGS",
    "FeedForward",
    "MoE",
    "MoEStats",
    "Router",
    "StackedExperts",
    "convert_mixtral",
    "from_mixtral",
    "moe_aux_loss",
    "moe_layers",
    "to_mixtral",
]
