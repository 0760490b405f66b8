"""Dense models -> mixture of experts, and MoE models -> leantorch's :class:`~leantorch.nn.moe.MoE`.

* :mod:`.sites`: where the dense FFNs are (:func:`find_ffns`, through the dependency graph's
  neuron groups, on example inputs);
* :mod:`.split`: the exact split of an FFN's hidden neurons into experts (``"moefy.split"``);
* :mod:`.upcycle`: ``E`` copies of an FFN behind a new router (``"moefy.upcycle"``);
* :mod:`.mixtral`: a transformers Mixtral model's sparse blocks -> :class:`~leantorch.nn.moe.MoE`
  (``"moefy.convert_mixtral"``).

Every transform returns ``(new_model, Change)``, copies the model unless ``inplace=True`` and
selects sites with ``include`` / ``exclude`` globs over module paths. The functions are named
as registered (``split``, ``upcycle``); ``moefy_split`` / ``moefy_upcycle`` are the older aliases.
"""

from leantorch.compress.moefy.mixtral import convert_mixtral
from leantorch.compress.moefy.sites import FFNSite, find_ffns, search_ffns
from leantorch.compress.moefy.split import (
    PARTITIONS,
    ROUTER_INITS,
    fit_router,
    moefy_split,
    partition_neurons,
    split,
    split_ffn,
)
from leantorch.compress.moefy.upcycle import moefy_upcycle, upcycle, upcycle_ffn

__all__ = [
    "PARTITIONS",
    "ROUTER_INITS",
    "FFNSite",
    "convert_mixtral",
    "find_ffns",
    "fit_router",
    "moefy_split",
    "moefy_upcycle",
    "partition_neurons",
    "search_ffns",
    "split",
    "split_ffn",
    "upcycle",
    "upcycle_ffn",
]
