"""Rules for ops that move or reshape axes without mixing values across them: views and
reshapes (an axis split by a reshape refines its atom into a product), ``permute`` /
``transpose`` / ``t``, ``unsqueeze`` / ``squeeze``, ``expand`` (a broadcast copy is a new index
space, tagged ``"broadcast"``), ``repeat``, ``slice`` / ``narrow`` / ``split`` (a part of an
axis refines its atom into a sum), ``unbind``, ``cat`` (a sum of the inputs' axes), ``stack``,
``pad`` and ``roll`` (a padded or rolled axis is fixed)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from leantorch.compress.graph.fx import bind, shape_of
from leantorch.compress.graph.rules.registry import Unsupported, axis, rule, terms_of
from leantorch.compress.graph.terms import ONE, Atom, Term, concat, factors, product

# the rules register themselves with @rule: nothing here is imported by name
__all__: list[str] = []

if TYPE_CHECKING:
    from leantorch.compress.graph.propagation import Propagator

_VIEWS = {"aten.view", "aten.reshape", "aten._unsafe_view", "aten.flatten", "aten.unflatten",
          "aten.view_as", "aten.reshape_as"}


@rule(*_VIEWS)
def _view(p: Propagator, node: torch.fx.Node, val: Any, where: str) -> list[Term]:
    return _reshape(p, terms_of(p, node.args[0]), shape_of(val), where)


def _reshape(p: Propagator, terms: list[Term], shape: Sequence[int], where: str) -> list[Term]:
    """The terms of ``terms`` viewed as ``shape``: the factors of the input, in order, are
    grouped into the output axes, and a factor that straddles two output axes is split
    (``(B, S, H*D) -> (B, S, H, D)`` refines the ``H*D`` atom into ``H x D`` everywhere). Any
    other reshape mixes dimensions: every input axis is fixed."""
    pending: list[Term] = []  # the input's factors not yet placed, outermost first
    for term in terms:
        pending.extend(factors(p.dims.resolve(term)))
    pending = [f for f in pending if p.dims.size(f) > 1]
    out: list[Term] = []
    i = 0
    for size in shape:
        if size == 1:
            out.append(ONE)
            continue
        taken: list[Term] = []
        covered = 1
        while covered < size:
            if i >= len(pending):
                return _mixed(p, terms, shape, where)
            factor = p.dims.resolve(pending[i])
            f_size = p.dims.size(factor)
            if covered * f_size <= size:
                taken.append(factor)
                covered *= f_size
                i += 1
                continue
            need = size // covered
            if size % covered or f_size % need or not isinstance(factor, Atom):
                return _mixed(p, terms, shape, where)
            first, second = p.dims.split_product(factor, need)
            pending[i:i + 1] = [first, second]
        if covered != size:
            return _mixed(p, terms, shape, where)
        out.append(product(taken))
    if i != len(pending):
        return _mixed(p, terms, shape, where)
    return out


def _mixed(p: Propagator, terms: list[Term], shape: Sequence[int], where: str) -> list[Term]:
    reason = f"{where}: reshape mixes dimensions"
    for term in terms:
        p.dims.block(term, reason)
    return p.fresh(shape, reason)


@rule("aten.permute")
def _permute(p: Propagator, node: torch.fx.Node, val: Any, where: str) -> list[Term]:
    x = terms_of(p, node.args[0])
    order = [axis(d, len(x)) for d in node.args[1]]
    return [x[d] for d in order]


@rule("aten.transpose", "aten.swapaxes", "aten.swapdims")
def _transpose(p: Propagator, node: torch.fx.Node, val: Any, where: str) -> list[Term]:
    x = list(terms_of(p, node.args[0]))
    a, b = axis(node.args[1], len(x)), axis(node.args[2], len(x))
    x[a], x[b] = x[b], x[a]
    return x


@rule("aten.t", "aten.numpy_T")
def _t(p: Propagator, node: torch.fx.Node, val: Any, where: str) -> list[Term]:
    return list(reversed(terms_of(p, node.args[0])))


@rule("aten.unsqueeze")
def _unsqueeze(p: Propagator, node: torch.fx.Node, val: Any, where: str) -> list[Term]:
    x = list(terms_of(p, node.args[0]))
    d = node.args[1]
    d = d + len(x) + 1 if d < 0 else d
    return [*x[:d], ONE, *x[d:]]


@rule("aten.squeeze")
def _squeeze(p: Propagator, node: torch.fx.Node, val: Any, where: str) -> list[Term]:
    x = terms_of(p, node.args[0])
    return _reshape(p, x, shape_of(val), where)


@rule("aten.expand", "aten.expand_as", "aten.broadcast_to")
def _expand(p: Propagator, node: torch.fx.Node, val: Any, where: str) -> list[Term]:
    x = terms_of(p, node.args[0])
    shape = shape_of(val)
    offset = len(shape) - len(x)
    out = []
    for i, size in enumerate(shape):
        k = i - offset
        if k >= 0 and p.dims.size(x[k]) == size:
            out.append(x[k])
        else:
            fresh = p.dims.new(size)  # a broadcast copy: its own index space
            p.dims.tag(fresh, "broadcast")
            out.append(fresh)
    return out


@rule("aten.repeat", "aten.tile", "aten.repeat_interleave")
def _repeat(p: Propagator, node: torch.fx.Node, val: Any, where: str) -> list[Term]:
    x = terms_of(p, node.args[0]) if isinstance(node.args[0], torch.fx.Node) else []
    shape = shape_of(val)
    offset = len(shape) - len(x)
    out = []
    for i, size in enumerate(shape):
        k = i - offset
        if k >= 0 and p.dims.size(x[k]) == size:
            out.append(x[k])
        else:
            if k >= 0:
                p.dims.block(x[k], f"{where}: repeated")
            out.append(p.dims.new(size, f"{where}: repeated"))
    return out


@rule("aten.slice")
def _slice(p: Propagator, node: torch.fx.Node, val: Any, where: str) -> list[Term]:
    x = list(terms_of(p, node.args[0]))
    args = bind(node)
    d = axis(args["dim"], len(x))
    size = p.dims.size(x[d])
    start, end, step = args.get("start"), args.get("end"), args.get("step") or 1
    start = 0 if start is None else (start + size if start < 0 else min(start, size))
    end = size if end is None else (end + size if end < 0 else min(end, size))
    if start == 0 and end == size and step == 1:
        return x
    if step != 1 or end <= start:
        p.dims.block(x[d], f"{where}: strided or empty slice")
        x[d] = p.dims.new(len(range(start, end, step)), f"{where}: slice")
        return x
    x[d] = p.dims.part(x[d], start, end, where)
    return x


@rule("aten.roll")
def _roll(p: Propagator, node: torch.fx.Node, val: Any, where: str) -> list[Term]:
    """A cyclic shift along some dimensions (Swin's shifted windows roll the spatial axes).
    The other dimensions pass through untouched. Along a rolled dimension index ``i`` moves to
    ``(i + shift) % size``: once units are cut the same shift on the shorter axis moves them
    elsewhere, so a rolled dimension is never cut (and a roll without ``dims``, over the
    flattened tensor, fixes every dimension)."""
    x = list(terms_of(p, node.args[0]))
    args = bind(node)
    dims = args.get("dims") or []
    dims = [dims] if isinstance(dims, int) else list(dims)
    rolled = [axis(d, len(x)) for d in dims] if dims else list(range(len(x)))
    for d in rolled:
        p.dims.block(x[d], f"{where}: rolled along this dimension (the shift depends on its "
                     "length)")
    return x


@rule("aten.narrow")
def _narrow(p: Propagator, node: torch.fx.Node, val: Any, where: str) -> list[Term]:
    x = list(terms_of(p, node.args[0]))
    d = axis(node.args[1], len(x))
    start, length = int(node.args[2]), int(node.args[3])
    x[d] = p.dims.part(x[d], start, start + length, where)
    return x


@rule("aten.split", "aten.split_with_sizes", "aten.chunk", "aten.unsafe_split",
       "aten.tensor_split")
def _split(p: Propagator, node: torch.fx.Node, val: Any, where: str) -> list[list[Term]]:
    x = list(terms_of(p, node.args[0]))
    args = bind(node)
    d = axis(args.get("dim") or 0, len(x))
    sizes = [shape_of(v)[d] for v in val]
    pieces = [p.dims.new(s) for s in sizes]
    p.unify(x[d], concat(pieces), where)
    return [[*x[:d], p.dims.resolve(piece), *x[d + 1:]] for piece in pieces]


@rule("aten.unbind")
def _unbind(p: Propagator, node: torch.fx.Node, val: Any, where: str) -> list[list[Term]]:
    x = list(terms_of(p, node.args[0]))
    d = axis(node.args[1] if len(node.args) > 1 else 0, len(x))
    p.dims.block(x[d], f"{where}: unbound into separate tensors")
    return [x[:d] + x[d + 1:] for _ in val]


@rule("aten.cat", "aten.concat", "aten.concatenate")
def _cat(p: Propagator, node: torch.fx.Node, val: Any, where: str) -> list[Term]:
    tensors = [terms_of(p, t) for t in node.args[0]]
    shape = shape_of(val)
    tensors = [t for t in tensors if not (len(t) == 1 and p.dims.size(t[0]) == 0)]
    d = axis(node.args[1] if len(node.args) > 1 else 0, len(shape))
    out = list(tensors[0])
    for t in tensors[1:]:
        for i in range(len(shape)):
            if i != d:
                p.unify(out[i], t[i], where)
    out[d] = concat(t[d] if p.dims.size(t[d]) > 1 else p.dims.new(1) for t in tensors)
    if p.dims.size(out[d]) != shape[d]:
        raise Unsupported("cat sizes")
    return out


@rule("aten.stack")
def _stack(p: Propagator, node: torch.fx.Node, val: Any, where: str) -> list[Term]:
    tensors = [terms_of(p, t) for t in node.args[0]]
    shape = shape_of(val)
    d = axis(node.args[1] if len(node.args) > 1 else 0, len(shape))
    out = list(tensors[0])
    for t in tensors[1:]:
        for i in range(len(out)):
            p.unify(out[i], t[i], where)
    return [*out[:d], p.dims.new(shape[d], f"{where}: stacked"), *out[d:]]


@rule("aten.pad", "aten.constant_pad_nd", "aten.reflection_pad1d", "aten.reflection_pad2d",
       "aten.replication_pad1d", "aten.replication_pad2d")
def _pad(p: Propagator, node: torch.fx.Node, val: Any, where: str) -> list[Term]:
    x = list(terms_of(p, node.args[0]))
    pads = list(node.args[1])
    shape = shape_of(val)
    for i in range(len(pads) // 2):
        d = len(x) - 1 - i
        if pads[2 * i] or pads[2 * i + 1]:
            p.dims.block(x[d], f"{where}: padded")
            x[d] = p.dims.new(shape[d], f"{where}: padded")
    return x
