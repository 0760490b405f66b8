"""transformers' Mixtral sparse-MoE block <-> :class:`MoE`, weights copied exactly.

Mixtral stores ``gate.weight (E, dim)``, ``experts.gate_up_proj (E, 2*hidden, dim)`` (gate
rows first, then up) and ``experts.down_proj (E, dim, hidden)``, i.e. each expert as
``out x in`` matrices; :class:`StackedExperts` keeps ``in x out`` (``w_in (E, dim, 2*hidden)``,
``w_out (E, hidden, dim)``), so the conversion is a transpose of each expert. The router is the
same computation (``F.linear`` of the same weight, softmax in float32, top-k, renormalised), so
the two layers choose the same experts bit for bit.

Swapping every block of a whole model is a model transform:
:func:`leantorch.compress.moefy.convert_mixtral` (registered as ``"moefy.convert_mixtral"``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from leantorch.errors import LeanError, LeanTypeError
from leantorch.nn.moe.layer import MoE

__all__ = ["from_mixtral", "to_mixtral"]

# transformers' activation names -> ours
_HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "relu": "relu",
                   "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                   "gelu_fast": "gelu_tanh"}
_OUR_ACTIVATIONS = {"silu": "silu", "gelu": "gelu", "relu": "relu",
                    "gelu_tanh": "gelu_pytorch_tanh"}


def _is_mixtral_block(module: nn.Module) -> bool:
    return type(module).__name__ == "MixtralSparseMoeBlock"


def from_mixtral(block: nn.Module, *, backend: str = "auto", **moe_args: Any) -> MoE:
    """A :class:`MoE` with the weights of a transformers ``MixtralSparseMoeBlock``.

    ``moe_args`` override the layer's other options (balance losses, backend...); the routing
    itself (softmax, top-k, renormalised gates, dropless) is Mixtral's. Mixtral's training-time
    input jitter (``router_jitter_noise``) has no counterpart: a block with jitter is refused.
    """
    if not _is_mixtral_block(block):
        raise LeanTypeError(f"from_mixtral: expected a transformers MixtralSparseMoeBlock, got "
                            f"{type(block).__name__}")
    if getattr(block, "jitter_noise", 0):
        raise LeanError(f"from_mixtral: router_jitter_noise={block.jitter_noise} has no "
                        "leantorch counterpart; set config.router_jitter_noise = 0")
    experts = block.experts
    config = experts.config
    activation = _HF_ACTIVATIONS.get(config.hidden_act)
    if activation is None:
        raise LeanError(f"from_mixtral: hidden_act={config.hidden_act!r} is not supported; "
                        f"supported: {', '.join(sorted(_HF_ACTIVATIONS))}")
    args: dict[str, Any] = {"activation": activation, "gated": True, "score": "softmax",
                            "gates": "renorm", "routing": "topk", "capacity_factor": None,
                            "balance_loss_weight": float(config.router_aux_loss_coef),
                            "backend": backend}
    args.update(moe_args)
    moe = MoE(experts.hidden_dim, experts.intermediate_dim, experts.num_experts, block.top_k,
              **args)
    weight = experts.gate_up_proj
    moe = moe.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        moe.router.weight.copy_(block.gate.weight)
        moe.experts.w_in.copy_(experts.gate_up_proj.transpose(1, 2))
        moe.experts.w_out.copy_(experts.down_proj.transpose(1, 2))
    moe.train(block.training)
    return moe


def to_mixtral(moe: MoE, config: Any = None, experts_implementation: str = "eager") -> nn.Module:
    """A transformers ``MixtralSparseMoeBlock`` with the weights of ``moe`` (which must use
    Mixtral's routing: softmax, top-k, renormalised gates, dropless, gated bias-free experts,
    no shared or zero-computation experts). ``config``: a ``MixtralConfig`` to start from
    (its sizes are overwritten); ``experts_implementation``: ``"eager"``, ``"grouped_mm"`` or
    ``"batched_mm"``."""
    try:
        import transformers
    except ImportError as error:
        raise LeanError("to_mixtral needs transformers: pip install 'leantorch[hf]'") from error
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    if not isinstance(moe, MoE):
        raise LeanTypeError(f"to_mixtral: expected a leantorch MoE, got {type(moe).__name__}")
    r, e = moe.router, moe.experts
    problems = [what for what, bad in (
        ("score must be 'softmax'", r.score != "softmax"),
        ("gates must be 'renorm'", r.gates != "renorm"),
        ("routing must be 'topk'", r.routing != "topk"),
        ("no noisy routing", r.noisy), ("no router bias", r.bias is not None),
        ("no gating residual", r.prev_experts > 0),
        ("no auxiliary-loss-free bias", r.expert_bias is not None),
        ("dropless (capacity_factor=None)", moe.capacity_factor is not None),
        ("gated experts", not e.gated), ("no expert biases", e.b_in is not None),
        ("no output bias", moe.output_bias is not None), ("no shared experts", moe.shared),
        ("no zero-computation experts", moe.total_experts != moe.num_experts),
        ("no dropout", moe.dropout > 0),
    ) if bad]
    if problems:
        raise LeanError("to_mixtral: this MoE has no Mixtral equivalent; Mixtral needs "
                        + "; ".join(problems))
    config = copy.deepcopy(config) if config is not None else transformers.MixtralConfig()
    config.hidden_size, config.intermediate_size = moe.dim, moe.hidden
    config.num_local_experts, config.num_experts_per_tok = moe.num_experts, moe.k
    config.hidden_act = _OUR_ACTIVATIONS[e.activation]
    config.router_jitter_noise = 0.0
    config._experts_implementation = experts_implementation
    with torch.device("meta"):
        block = MixtralSparseMoeBlock(config)
    block = block.to_empty(device=e.w_in.device).to(e.w_in.dtype)
    with torch.no_grad():
        block.gate.weight.copy_(r.weight)
        block.experts.gate_up_proj.copy_(e.w_in.transpose(1, 2))
        block.experts.down_proj.copy_(e.w_out.transpose(1, 2))
    block.train(moe.training)
    return block
