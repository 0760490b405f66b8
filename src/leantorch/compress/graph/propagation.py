"""Propagation: run the exported fx graph once over *terms* instead of tensors.

:class:`Propagator` walks the nodes of an exported program in order. Each value gets the terms
of its axes (:mod:`.terms`): a parameter or buffer gets fresh atoms (the same atoms when a
second trace, or a tied name, meets the same tensor), a model input or constant gets atoms that
are blocked, and each op's output comes from its rule (:mod:`.rules`), which states on the way
which axes are the same index space. Ops without a rule are handled here: pointwise ops
broadcast their operands (aligned axes are unified), pass-through ops (dtype casts, dropout,
``clone``...) keep their input's terms, factories get fresh atoms, the autocast / grad-mode
wrappers are followed into their subgraph, and anything else is *opaque*: its inputs and outputs
are blocked with a reason naming the op.

What the propagator collects beside the facts in ``dims`` is read by the grouping
(:mod:`.groups`): the terms of every parameter (``param_terms``), the attention ops, the norms,
the terms produced inside each module (``scopes``) and the tensors some op reads (``used``).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from leantorch.compress.graph.fx import module_of, op_name, shape_of
from leantorch.compress.graph.rules import RULES, Unsupported
from leantorch.compress.graph.terms import ONE, Dims, Term, is_term

__all__ = ["IGNORED", "Propagator"]

_PASS_THROUGH = {
    "aten.to", "aten._to_copy", "aten.alias", "aten.clone", "aten.contiguous", "aten.detach",
    "aten.dropout", "aten.dropout_", "aten.feature_dropout", "aten.alpha_dropout",
    "aten.lift_fresh_copy", "aten.type_as", "aten.zeros_like", "aten.ones_like",
    "aten.empty_like", "aten.full_like", "aten.rand_like", "aten.randn_like", "aten.copy",
    "aten.fill", "aten.fill_", "aten.zero_", "aten.bernoulli", "aten.bernoulli_", "aten.uniform_",
    "aten.normal_",
}
_POINTWISE = {"aten.__and__", "aten.__or__", "aten.__xor__", "aten.__iand__", "aten.__ior__",
              "aten.bitwise_and", "aten.bitwise_or", "aten.bitwise_xor", "aten.bitwise_not",
              "aten.logical_and", "aten.logical_or", "aten.logical_not", "aten.logical_xor",
              "aten.masked_fill", "aten.masked_fill_"}
IGNORED = {"aten._assert_tensor_metadata", "aten._assert_scalar", "aten.sym_constrain_range",
           "aten.sym_constrain_range_for_size", "aten._assert_async", "aten.sym_size",
           "aten.sym_numel", "aten.sym_stride", "aten._local_scalar_dense",
           "aten.sym_storage_offset"}
_FACTORIES = {"aten.arange", "aten.zeros", "aten.ones", "aten.full", "aten.empty",
              "aten.new_ones", "aten.new_zeros", "aten.new_full", "aten.new_empty", "aten.rand",
              "aten.randn", "aten.randint", "aten.scalar_tensor", "aten.eye", "aten.linspace",
              "aten.tensor", "aten.empty_strided", "aten.new_empty_strided"}


class Propagator:
    """Walks an exported graph and states, op by op, which dimensions are the same."""

    def __init__(self, program: Any, model: nn.Module) -> None:
        self.program = program
        self.model = model
        self.dims = Dims()
        self.param_terms: dict[str, list[Term]] = {}
        self.attention: list[dict[str, Any]] = []  # sdpa / act x act matmul sites
        self.values: dict[torch.fx.Node, Any] = {}
        self.scopes: dict[str, list[Term]] = {}  # module path -> terms produced in it
        self.norms: list[tuple[str, list[Term]]] = []  # (module, normalised dims) of norms
        self.weight_nodes: set[torch.fx.Node] = set()  # placeholders holding a param / buffer
        self.used: set[str] = set()  # params / buffers some traced op reads

    # ---- helpers
    def value(self, arg: Any) -> Any:
        """The terms propagated for ``arg``: a node's recorded value, the same structure for a list
        or tuple of nodes, None for anything else (constants)."""
        if isinstance(arg, torch.fx.Node):
            return self.values.get(arg)
        if isinstance(arg, list | tuple):
            return type(arg)(self.value(a) for a in arg)
        return None

    def fresh(self, shape: Sequence[int], blocked: str | None = None) -> list[Term]:
        """One new atom per entry of ``shape`` (``ONE`` for size 1), blocked
        for ``blocked`` if given."""
        return [self.dims.new(s, blocked) for s in shape]

    def fresh_like(self, val: Any, blocked: str | None = None) -> Any:
        """Fresh terms shaped like ``val`` (a tensor, or nested lists/tuples of tensors; None for
        non-tensors), blocked for ``blocked`` if given."""
        if isinstance(val, torch.Tensor):
            return self.fresh(shape_of(val), blocked)
        if isinstance(val, list | tuple):
            return [self.fresh_like(v, blocked) for v in val]
        return None

    def block_value(self, value: Any, reason: str) -> None:
        """Block every term in ``value`` (a term list or nested lists/tuples of them) for
        ``reason``: those axes may not be cut."""
        if value is None:
            return
        if isinstance(value, list) and value and is_term(value[0]):
            for term in value:
                self.dims.block(term, reason)
            return
        if isinstance(value, list | tuple):
            for v in value:
                self.block_value(v, reason)

    def unify(self, a: Term, b: Term, why: str) -> None:
        """Record that terms ``a`` and ``b`` are the same axis (``why`` is
        kept for the explanation of a group)."""
        self.dims.unify(a, b, why)

    # ---- main loop
    def run(self, graph: torch.fx.Graph, inputs: dict[str, Any] | None = None) -> Any:
        """Propagate through ``graph`` (the program's, or a wrapped subgraph fed ``inputs``);
        returns the terms of the user outputs. Several programs (the eval- and training-mode
        traces) may run through one propagator: a parameter seen again is unified with its
        earlier terms, so both forwards' couplings land in one graph."""
        signature = self.program.graph_signature if inputs is None else None
        kinds: dict[str, tuple[str, str | None]] = {}
        mutated: dict[int, str] = {}  # output position -> buffer it writes back
        user_outputs: list[int] | None = None
        if signature is not None:
            for spec in signature.input_specs:
                kinds[spec.arg.name] = (spec.kind.name, spec.target)
            user_outputs = []
            for i, spec in enumerate(signature.output_specs):
                if spec.kind.name == "USER_OUTPUT":
                    user_outputs.append(i)
                elif spec.kind.name == "BUFFER_MUTATION" and spec.target:
                    mutated[i] = spec.target
        tensors = {}
        if signature is not None:
            tensors = dict(self.model.named_parameters(remove_duplicate=False))
            tensors.update(dict(self.model.named_buffers(remove_duplicate=False)))
        by_storage: dict[int, list[Term]] = {}
        outputs = None
        for node in graph.nodes:
            val = node.meta.get("val")
            if node.op == "placeholder":
                if inputs is not None:
                    self.values[node] = inputs.get(node.name)
                    continue
                kind, target = kinds.get(node.name, ("USER_INPUT", None))
                if kind in ("PARAMETER", "BUFFER") and isinstance(val, torch.Tensor):
                    terms = self.fresh(shape_of(val))
                    if target in self.param_terms:  # seen by an earlier trace: same tensor
                        for a, b in zip(self.param_terms[target], terms, strict=True):
                            self.unify(a, b, f"{target} in both traced modes")
                    else:
                        self.param_terms[target] = terms
                    self.values[node] = terms
                    self.weight_nodes.add(node)
                    if any(not (u.op == "call_function" and op_name(u.target) in IGNORED)
                           for u in node.users):
                        self.used.add(target)
                    tensor = tensors.get(target)
                    if tensor is not None:
                        # tied tensors (one storage, two names) may appear as two placeholders
                        earlier = by_storage.setdefault(id(tensor), terms)
                        for a, b in zip(earlier, terms, strict=True):
                            self.unify(a, b, f"tied tensor {target}")
                elif kind == "CONSTANT_TENSOR":
                    self.values[node] = self.fresh_like(val, f"constant tensor {target}")
                else:
                    self.values[node] = self.fresh_like(val, f"model input {node.name}")
            elif node.op == "call_function":
                self.values[node] = self.call(node, val)
                module, _ = module_of(node)
                out = self.values[node]
                if isinstance(out, list) and out and is_term(out[0]):
                    self.scopes.setdefault(module, []).extend(out)
            elif node.op == "output":
                outputs = self.value(node.args[0])
                if user_outputs is not None and isinstance(outputs, list | tuple):
                    for i, buffer in mutated.items():  # a buffer's new value: the same axes
                        written = outputs[i] if i < len(outputs) else None
                        if isinstance(written, list) and buffer in self.param_terms and \
                                len(written) == len(self.param_terms[buffer]):
                            for a, b in zip(written, self.param_terms[buffer], strict=True):
                                self.unify(a, b, f"{buffer} written back")
                    outputs = [outputs[i] for i in user_outputs if i < len(outputs)]
            elif node.op == "get_attr":
                self.values[node] = None
        return outputs

    def call(self, node: torch.fx.Node, val: Any) -> Any:
        """The output terms of the ``call_function`` node ``node`` (``val``: its traced value): by
        its rule, as a pass-through, factory or pointwise op, else opaque (its axes blocked)."""
        target = node.target
        if target is operator.getitem:
            source = self.value(node.args[0])
            if isinstance(source, list | tuple) and not (source and is_term(source[0])):
                return source[node.args[1]]
            return self.fresh_like(val, "indexing a value the graph does not follow")
        name = op_name(target)
        module, _cls = module_of(node)
        where = f"{name} in {module or '(model)'}"
        if name in IGNORED:
            return None
        rule = RULES.get(name)
        if rule is not None:
            try:
                return rule(self, node, val, where)
            except Unsupported as why:
                return self.opaque(node, val, f"{where}: {why}")
        if isinstance(target, torch._ops.HigherOrderOperator):
            return self.higher_order(node, val, where)
        if name in _PASS_THROUGH:
            return self.pass_through(node, val)
        if name in _FACTORIES:
            return self.fresh_like(val)
        if name in _POINTWISE or (isinstance(target, torch._ops.OpOverload) and
                                   torch.Tag.pointwise in target.tags):
            return self.broadcast(node, val, where)
        return self.opaque(node, val, f"{where} is not understood by the dependency graph")

    def opaque(self, node: torch.fx.Node, val: Any, reason: str) -> Any:
        """An op the graph cannot see through: its tensor inputs and outputs are fixed."""
        for arg in tree_flatten((node.args, node.kwargs))[0]:
            if isinstance(arg, torch.fx.Node):
                self.block_value(self.value(arg), reason)
        return self.fresh_like(val, reason)

    def pass_through(self, node: torch.fx.Node, val: Any) -> Any:
        """The first argument's terms for an op whose output has the same axes (clone, dropout...);
        fresh terms when the ranks differ or the input is not followed."""
        source = self.value(node.args[0])
        shape = shape_of(val)
        if source is None or shape is None or len(source) != len(shape):
            return self.fresh_like(val)
        return list(source)

    def broadcast(self, node: torch.fx.Node, val: Any, where: str) -> list[Term] | None:
        """Output terms of a pointwise op: the tensor operands' terms broadcast to ``val``'s shape,
        equal axes unified (``where`` names the op in the reasons)."""
        shape = shape_of(val)
        if shape is None:
            return self.fresh_like(val)
        operands = [self.value(a) for a in node.args if isinstance(a, torch.fx.Node)]
        operands += [self.value(a) for a in node.kwargs.values() if isinstance(a, torch.fx.Node)]
        return self.broadcast_terms([o for o in operands if o is not None], shape, where)

    def broadcast_terms(self, operands: list[list[Term]], shape: Sequence[int],
                        where: str) -> list[Term]:
        """Broadcast ``operands`` (term lists, right-aligned) to ``shape``: size-1 axes are
        ``ONE``, axes two operands share are unified, the rest are fresh."""
        out: list[Term | None] = [ONE if s == 1 else None for s in shape]
        for operand in operands:
            offset = len(shape) - len(operand)
            for k, term in enumerate(operand):
                i = offset + k
                if i < 0 or shape[i] == 1 or self.dims.size(term) == 1:
                    continue
                if out[i] is None:
                    out[i] = term
                else:
                    self.unify(out[i], term, where)
        return [t if t is not None else self.dims.new(s) for t, s in zip(out, shape, strict=True)]

    def higher_order(self, node: torch.fx.Node, val: Any, where: str) -> Any:
        """wrap_with_set_grad_enabled / wrap_with_autocast: follow the wrapped subgraph."""
        name = getattr(node.target, "__name__", str(node.target))
        if name not in ("wrap_with_set_grad_enabled", "wrap_with_autocast"):
            return self.opaque(node, val, f"{where}: higher-order op {name}")
        submodule_nodes = [a for a in node.args if isinstance(a, torch.fx.Node)
                           and a.op == "get_attr"]
        if len(submodule_nodes) != 1:
            return self.opaque(node, val, f"{where}: higher-order op {name}")
        gm = getattr(self.program.graph_module, submodule_nodes[0].target)
        operands = [a for a in node.args[node.args.index(submodule_nodes[0]) + 1:]]
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        inputs = {p.name: self.value(a) for p, a in zip(placeholders, operands, strict=False)}
        out = self.run(gm.graph, inputs)
        return list(out) if isinstance(out, tuple) else out
