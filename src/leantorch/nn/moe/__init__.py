"""Mixture-of-experts layers: :class:`MoE` (routed FFN experts with capacity or dropless
dispatch, shared experts, MoE++ zero-computation experts, balancing losses), its parts
(:class:`Router`, :class:`StackedExperts`, :class:`FeedForward`) and Mixtral block import/export
(:func:`from_mixtral`, :func:`to_mixtral`; the whole-model swap is
:func:`leantorch.compress.moefy.convert_mixtral`)."""

from leantorch.nn.moe.experts import FeedForward, StackedExperts
from leantorch.nn.moe.interop import from_mixtral, to_mixtral
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
    "from_mixtral",
    "moe_aux_loss",
    "moe_layers",
    "to_mixtral",
]
