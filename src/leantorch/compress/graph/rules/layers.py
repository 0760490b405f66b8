"""Rules for layers with weights: linear and matrix products (``linear``, ``matmul`` / ``mm`` /
``bmm``, ``addmm``, ``einsum``), convolutions (grouped, depthwise, transposed), normalisations
(batch / instance / layer / RMS / group norm), ``lstm``, ``embedding``, and the stand-in of a
leaf module (a black box: everything it touches is fixed).

A weight couples the input's features with its columns and its outputs with its rows (and the
bias); a normalisation couples its affine tensors with the normalised axes and marks them
inexact (the statistics read every index). A product of two activations is an attention score
or an attention-weighted value: its contracted and value axes are per-head sizes and its batch
axis the heads (see :mod:`.attention_moe`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from leantorch.compress.graph.fx import bind, module_of, op_name, shape_of
from leantorch.compress.graph.rules.attention_moe import tag_heads
from leantorch.compress.graph.rules.registry import Unsupported, rule, terms_of
from leantorch.compress.graph.terms import ONE, Term, concat, product

# the rules register themselves with @rule: nothing here is imported by name
__all__: list[str] = []

if TYPE_CHECKING:
    from leantorch.compress.graph.propagation import Propagator


@rule("aten.linear")
def _linear(p: Propagator, node: torch.fx.Node, val: Any, where: str) -> list[Term]:
    args = bind(node)
    x, w = terms_of(p, args["input"]), terms_of(p, args["weight"])
    if len(w) == 1:  # a vector weight: dot product
        p.unify(x[-1], w[0], where)
        return x[:-1]
    p.unify(x[-1], w[1], where)
    out = [*x[:-1], w[0]]
    if args.get("bias") is not None:
        p.unify(terms_of(p, args["bias"])[0], w[0], where)
    return out


def _matmul_terms(p: Propagator, node: torch.fx.Node, a: list[Term], b: list[Term],
                  shape: Sequence[int], where: str, weight_b: bool, weight_a: bool) -> list[Term]:
    """Batched matmul: a (..., n, k) @ b (..., k, m) -> (..., n, m); 1-D operands as in torch."""
    if len(a) == 1:
        a = [ONE, *a]
        squeeze_first = True
    else:
        squeeze_first = False
    if len(b) == 1:
        b = [*b, ONE]
        squeeze_last = True
    else:
        squeeze_last = False
    p.unify(a[-1], b[-2], where)
    batch_shape = list(shape[:len(shape) - (0 if squeeze_first else 1) - (0 if squeeze_last else 1)])
    batch = p.broadcast_terms([a[:-2], b[:-2]], batch_shape, where) if batch_shape else []
    if not (weight_a or weight_b):
        # activation x activation (attention scores, attention-weighted values): the contracted
        # axis and the value axis are per-head sizes, and the batch axes are heads
        p.dims.block(a[-1], f"{where}: contracted between two activations (per-head size)")
        p.dims.block(b[-1], f"{where}: a per-head size of an activation product")
        p.dims.tag(a[-1], "head_dim")
        p.dims.tag(b[-1], "head_dim")
        if batch:
            tag_heads(p, batch[-1])
        module, _ = module_of(node)
        p.attention.append({"module": module, "heads": batch[-1] if batch else ONE,
                            "kv_heads": batch[-1] if batch else ONE})
    out = batch + ([] if squeeze_first else [a[-2]]) + ([] if squeeze_last else [b[-1]])
    return out


def _is_weight(p: Propagator, node: Any, depth: int = 6) -> bool:
    """Whether ``node`` is a parameter or buffer (possibly viewed or transposed)."""
    for _ in range(depth):
        if not isinstance(node, torch.fx.Node):
            return False
        if node.op == "placeholder":
            return node in p.weight_nodes
        if node.op != "call_function" or not node.args:
            return False
        name = op_name(node.target)
        if name not in ("aten.t", "aten.transpose", "aten.permute", "aten.view", "aten.reshape",
                        "aten.expand", "aten.alias", "aten.to", "aten._to_copy",
                        "aten.contiguous", "aten.unsqueeze", "aten.select", "aten.clone"):
            return False
        node = node.args[0]
    return False


@rule("aten.matmul", "aten.mm", "aten.bmm")
def _matmul(p: Propagator, node: torch.fx.Node, val: Any, where: str) -> list[Term]:
    a, b = terms_of(p, node.args[0]), terms_of(p, node.args[1])
    return _matmul_terms(p, node, a, b, shape_of(val), where,
                         _is_weight(p, node.args[1]), _is_weight(p, node.args[0]))


@rule("aten.addmm", "aten.baddbmm", "aten.addbmm")
def _addmm(p: Propagator, node: torch.fx.Node, val: Any, where: str) -> list[Term]:
    a, b = terms_of(p, node.args[1]), terms_of(p, node.args[2])
    out = _matmul_terms(p, node, a, b, shape_of(val), where,
                        _is_weight(p, node.args[2]), _is_weight(p, node.args[1]))
    bias = terms_of(p, node.args[0])
    return p.broadcast_terms([out, bias], shape_of(val), where)


@rule("aten.einsum")
def _einsum(p: Propagator, node: torch.fx.Node, val: Any, where: str) -> list[Term]:
    equation = node.args[0].replace(" ", "")
    operands = [terms_of(p, a) for a in node.args[1]]
    if "..." in equation or "->" not in equation:
        raise Unsupported(f"einsum {equation!r}")
    inputs, output = equation.split("->")
    letters: dict[str, Term] = {}
    specs = inputs.split(",")
    for spec, terms in zip(specs, operands, strict=True):
        for letter, term in zip(spec, terms, strict=True):
            if p.dims.size(term) == 1:
                continue
            if letter in letters:
                p.unify(letters[letter], term, where)
            else:
                letters[letter] = term
    out = []
    for letter, size in zip(output, shape_of(val), strict=True):
        out.append(letters.get(letter, ONE) if size > 1 else ONE)
    return out


def _conv_common(p: Propagator, x: list[Term], w: list[Term], bias: Any, groups: int,
                 transposed: bool, val: Any, where: str) -> list[Term]:
    shape = shape_of(val)
    in_channels = p.dims.size(x[1])
    for term in w[2:]:
        p.dims.block(term, f"{where}: kernel window")
        p.dims.tag(term, "kernel")
    if transposed:
        # weight (in, out / groups, *k)
        if groups != 1:
            raise Unsupported("grouped transposed convolution")
        p.unify(x[1], w[0], where)
        out_channels = w[1]
    else:
        # weight (out, in / groups, *k); channel c of group g is g * (in / groups) + c
        if groups == 1:
            p.unify(x[1], w[1], where)
            out_channels = w[0]
        else:
            per_group_in = in_channels // groups
            x_term = p.dims.resolve(x[1])
            w_term = p.dims.resolve(w[0])
            g_in = p.dims.split_outer(x_term, groups, where)
            g_out = p.dims.split_outer(w_term, groups, where)
            p.unify(g_in[0], g_out[0], where)
            p.dims.tag(g_in[0], "conv_groups")
            if per_group_in > 1:
                p.unify(g_in[1], w[1], where)
            out_channels = w[0]
    if bias is not None:
        p.unify(terms_of(p, bias)[0], out_channels, where)
    spatial = [p.dims.new(s, f"{where}: spatial size") for s in shape[2:]]
    return [x[0], out_channels, *spatial]


@rule("aten.conv1d", "aten.conv2d", "aten.conv3d")
def _conv(p: Propagator, node: torch.fx.Node, val: Any, where: str) -> list[Term]:
    args = bind(node)
    x, w = terms_of(p, args["input"]), terms_of(p, args["weight"])
    if len(x) != len(w):  # unbatched input
        raise Unsupported("unbatched convolution input")
    return _conv_common(p, x, w, args.get("bias"), int(args.get("groups") or 1), False, val,
                        where)


@rule("aten.convolution", "aten._convolution")
def _convolution(p: Propagator, node: torch.fx.Node, val: Any, where: str) -> list[Term]:
    args = bind(node)
    x, w = terms_of(p, args["input"]), terms_of(p, args["weight"])
    return _conv_common(p, x, w, args.get("bias"), int(args["groups"]), bool(args["transposed"]),
                        val, where)


@rule("aten.conv_transpose1d", "aten.conv_transpose2d", "aten.conv_transpose3d")
def _conv_transpose(p: Propagator, node: torch.fx.Node, val: Any, where: str) -> list[Term]:
    args = bind(node)
    x, w = terms_of(p, args["input"]), terms_of(p, args["weight"])
    return _conv_common(p, x, w, args.get("bias"), int(args.get("groups") or 1), True, val, where)


@rule("aten.batch_norm", "aten._native_batch_norm_legit_no_training",
       "aten._native_batch_norm_legit", "aten.native_batch_norm",
       "aten._native_batch_norm_legit_functional", "aten.instance_norm")
def _batch_norm(p: Propagator, node: torch.fx.Node, val: Any, where: str) -> Any:
    args = bind(node)
    x = terms_of(p, args["input"])
    for name in ("weight", "bias", "running_mean", "running_var"):
        if args.get(name) is not None:
            p.unify(terms_of(p, args[name])[0], x[1], where)
    if op_name(node.target) == "aten.instance_norm":
        p.dims.mark_inexact(x[1], f"{where}: instance statistics")
    if isinstance(val, tuple | list):
        return [list(x)] + [p.fresh_like(v) for v in val[1:]]
    return list(x)


@rule("aten.layer_norm", "aten.native_layer_norm", "aten.rms_norm")
def _layer_norm(p: Propagator, node: torch.fx.Node, val: Any, where: str) -> Any:
    args = bind(node)
    x = terms_of(p, args["input"])
    count = len(args["normalized_shape"])
    normalized = x[len(x) - count:]
    for name in ("weight", "bias"):
        if args.get(name) is not None:
            for a, b in zip(terms_of(p, args[name]), normalized, strict=True):
                p.unify(a, b, where)
    for term in normalized:
        p.dims.mark_inexact(term, f"{where}: normalised over this dimension")
        p.dims.tag(term, "layer_norm")
    p.norms.append((module_of(node)[0], list(normalized)))
    if isinstance(val, tuple | list):
        return [list(x)] + [p.fresh_like(v) for v in val[1:]]
    return list(x)


@rule("aten.group_norm", "aten.native_group_norm")
def _group_norm(p: Propagator, node: torch.fx.Node, val: Any, where: str) -> Any:
    args = bind(node)
    x = terms_of(p, args["input"])
    groups = int(args.get("num_groups") or args.get("group") or 1)
    for name in ("weight", "bias"):
        if args.get(name) is not None:
            p.unify(terms_of(p, args[name])[0], x[1], where)
    if groups > 1:
        p.dims.block(x[1], f"{where}: GroupNorm with {groups} groups fixes the channel count "
                     "per group")
    p.dims.mark_inexact(x[1], f"{where}: normalised over this dimension")
    if isinstance(val, tuple | list):
        return [list(x)] + [p.fresh_like(v) for v in val[1:]]
    return list(x)


@rule("aten.lstm")
def _lstm(p: Propagator, node: torch.fx.Node, val: Any, where: str) -> list[list[Term]]:
    """``nn.LSTM`` (one op for all layers and directions). Its hidden size ``H`` is one index
    space for every layer and direction (the module has one ``hidden_size``): the rows of
    ``weight_ih`` / ``weight_hh`` and both biases are ``4 gates x H`` (gate-major: input,
    forget, cell, output), the columns of ``weight_hh`` are ``H``, a deeper layer's
    ``weight_ih`` columns are the previous layer's output (``H``, or ``H + H`` when
    bidirectional), and so are the output's features and the last axis of ``h_n`` / ``c_n``.
    The first layer's ``weight_ih`` columns are the input's features. Cutting hidden unit ``u``
    is exact: with zero initial state a unit whose gate rows are zero keeps ``c = h = 0``."""
    if op_name(node.target) != "aten.lstm" or "batch_first" not in bind(node):
        raise Unsupported("packed sequences")
    args = bind(node)
    x = terms_of(p, args["input"])
    hx = [terms_of(p, h) for h in args["hx"]]
    params = [terms_of(p, w) for w in args["params"]]
    layers, dirs = int(args["num_layers"]), 2 if args["bidirectional"] else 1
    per = 4 if args["has_biases"] else 2
    if len(params) != layers * dirs * per:
        raise Unsupported("LSTM with proj_size (a projected hidden state)")
    size = p.dims.size(params[1][1])  # weight_hh_l0: (4H, H)
    hidden = p.dims.new(size)
    gates = p.dims.new(4, f"{where}: the four LSTM gates")
    p.dims.tag(gates, "gates")
    rows = product((gates, hidden))
    features = x[-1]
    for layer in range(layers):
        for direction in range(dirs):
            tensors = params[(layer * dirs + direction) * per:][:per]
            p.unify(tensors[0][1], features, where)  # weight_ih columns: this layer's input
            p.unify(tensors[1][1], hidden, where)  # weight_hh columns: the hidden state
            for t in tensors:
                p.unify(t[0], rows, where)
        features = concat((hidden,) * dirs)
    for h in hx:
        p.unify(h[-1], hidden, where)
    output = [*x[:-1], features]
    return [output, *(list(h) for h in hx)] if len(hx) == 2 else \
        [output, *p.fresh_like(list(val[1:]))]


@rule("aten.embedding")
def _embedding(p: Propagator, node: torch.fx.Node, val: Any, where: str) -> list[Term]:
    w, ids = terms_of(p, node.args[0]), terms_of(p, node.args[1])
    p.dims.block(w[0], f"{where}: rows indexed by ids")
    p.dims.tag(w[1], "embedding")
    return [*ids, w[1]]


@rule("leantorch.graph_leaf")
def _leaf(p: Propagator, node: torch.fx.Node, val: Any, where: str) -> Any:
    """A leaf module's stand-in (see :mod:`..tracing`): what enters or leaves it is fixed."""
    module, _ = module_of(node)
    reason = f"passes through the leaf module {module or '(model)'}"
    for arg in node.args[0]:
        p.block_value(p.value(arg), reason)
    return p.fresh_like(val, reason)
