"""One dependency graph: which tensor dimensions of a model must be cut together.

:func:`build_graph` traces the model with ``torch.export`` (non-strict, on example inputs) and
follows every tensor dimension through the aten graph. Each dimension of each value is
described by a *term* over *atoms*: an atom is an index space that cannot be cut further (the
``d`` channels of a conv output, the ``h`` heads of a projection), a product term is a reshape
of several atoms into one axis (``heads x head_dim``), a sum term is a concatenation
(``cat([q, k, v])`` or ``split``). Every op states which dimensions are the *same* index space
(a Linear's input features and the previous layer's outputs; both sides of a residual add; the
head axes of q, k and v in attention; a depthwise conv's input and output channels), and those
atoms are merged (union-find). A reshape that splits an axis refines its atom everywhere it
occurs, so ``view(x, (B, S, -1, head_dim))`` makes the projection's rows ``heads x head_dim``
and a group of heads cuts ``head_dim`` rows at a time.

After tracing, every merged atom that some parameter touches is a :class:`Group`: the units it
counts (channels, heads, neurons, width, experts), the tensors and dimensions it cuts
(:class:`TensorSlice`, with the exact indices for any set of units, :meth:`Group.slices`), and
whether it may be cut at all (``prunable``; ``reasons`` say why not: the dimension reaches a
model output, is indexed by token ids, is a per-head size, passes through an op or a leaf
module the graph does not understand...). ``exact`` says whether removing units is exactly
zeroing them (false when a normalisation or a softmax reads the whole dimension).

The graph is shared by every structural transform (pruning, sublayer removal, ...): it knows
nothing about particular model classes, except one documented rule for mixture-of-experts
layers (the routing from router rows to expert tensors goes through data, not shapes): a
module with an integer ``num_experts`` (or ``num_local_experts``) attribute stacks its
experts on the leading dimension of its parameters, and the router beside it (a sibling with
the same ``num_experts``) has one row per expert.

Both the eval-mode and the training-mode forward are traced and merged into one graph, so a
module only the training forward runs (an auxiliary head) is coupled with what feeds it.
Tensors that no traced forward reads cannot be placed: they are never cut and are listed in
``graph.unseen`` with the reason (a module holding such a parameter keeps all its tensors).

Tracing needs the forward to be traceable by ``torch.export`` (no data-dependent Python
control flow, no ``.item()`` or numpy round trips). When it is not, the error names the
innermost module that failed; pass ``leaf_modules=[path]`` to treat that module as a black box
(its tensors are not cut, and dimensions entering or leaving it are fixed).

Example::

    >>> graph = build_graph(model, example_inputs)          # doctest: +SKIP
    >>> for group in graph.groups(prunable=True):           # doctest: +SKIP
    ...     print(group)                                    # doctest: +SKIP

How the pieces connect (read in this order)::

    build_graph (this file)
      -> tracing.export_model         torch.export of the forward (eval, then training mode),
                                      leaf modules swapped for an opaque stand-in op
      -> propagation.Propagator.run   every node of the aten graph, over terms instead of
                                      tensors; each op's rule states which axes are the same
           rules/                     the op rules, one registry (rules.registry.RULES):
                                      layers, shapes, index_reduce, attention_moe
           terms.Dims                 atoms, Product / Sum terms, union-find, block / tag facts
      -> groups.DependencyGraph       merged atoms -> Group / TensorSlice; sublayers.py finds
                                      the removable residual branches
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

from torch import nn

from leantorch.compress.graph.groups import DependencyGraph, Group, TensorSlice
from leantorch.compress.graph.propagation import Propagator
from leantorch.compress.graph.sublayers import Sublayer
from leantorch.compress.graph.terms import Term
from leantorch.compress.graph.tracing import export_model, module_path_stack
from leantorch.errors import LeanError, LeanTypeError, describe
from leantorch.inputs import as_call

__all__ = [
    "DependencyGraph",
    "Group",
    "Sublayer",
    "TensorSlice",
    "Term",
    "build_graph",
    "default_inputs",
]

# prune.structured names the failing module of its own traced forwards with this stack
_module_path_stack = module_path_stack


def default_inputs(model: nn.Module, example_inputs: Any) -> tuple[tuple[Any, ...],
                                                                  dict[str, Any]]:
    """Positional and keyword inputs for tracing: ``use_cache=False`` is added for models whose
    forward takes it (a KV cache object is not a tensor the graph can follow)."""
    args, kwargs = as_call(example_inputs, owner="default_inputs")
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        parameters = {}
    if "use_cache" in parameters and "use_cache" not in kwargs:
        kwargs["use_cache"] = False
    return args, kwargs


def build_graph(model: nn.Module, example_inputs: Any, *,
                leaf_modules: Sequence[str] | None = None) -> DependencyGraph:
    """Trace ``model`` on ``example_inputs`` (a tensor, a tuple of positional inputs, a dict of
    keyword inputs, or ``(args, kwargs)``) in eval and in training mode, and group the coupled
    dimensions of both forwards. ``graph.modes`` says which modes were traced (only
    ``["eval"]`` when the training forward cannot be traced) and ``graph.unseen`` maps each
    tensor no traced forward reads to the reason it is never cut.

    ``leaf_modules``: module paths to treat as black boxes (see the module docstring). The model
    is left as it was (mode, tensors, RNG, no hooks)."""
    if not isinstance(model, nn.Module):
        raise LeanTypeError(f"build_graph: model must be a torch.nn.Module, got "
                            f"{type(model).__name__}")
    if example_inputs is None:
        raise LeanError("build_graph: example_inputs is required (the graph is traced on them): "
                        "give a tensor, a tuple of inputs or a dict of keyword inputs")
    leaves = list(leaf_modules or [])
    if not all(isinstance(p, str) for p in leaves):
        raise LeanTypeError(f"build_graph: leaf_modules must be module paths, got "
                            f"{describe(leaf_modules)}")
    args, kwargs = default_inputs(model, example_inputs)
    program = export_model(model, args, kwargs, leaves)
    propagator = Propagator(program, model)
    outputs = propagator.run(program.graph)
    propagator.block_value(outputs, "reaches a model output")
    # The training-mode forward may run modules the eval-mode one never reaches (an auxiliary
    # head, a distillation projection): trace it too and merge its couplings, so that such a
    # module is cut together with the layer feeding it.
    modes = ["eval"]
    unseen_reason = "neither the eval- nor the training-mode forward reads it"
    try:
        train_program = export_model(model, args, kwargs, leaves, training=True)
    except LeanError as error:
        unseen_reason = (f"the eval-mode forward does not read it (and the training-mode "
                         f"forward could not be traced: {str(error)[:200]})")
    else:
        modes.append("train")
        propagator.program = train_program
        train_outputs = propagator.run(train_program.graph)
        propagator.program = program
        propagator.block_value(train_outputs, "reaches a model output (training mode)")
    return DependencyGraph(model, propagator, program, leaves, unseen_reason, modes)
