"""Rules for indexing, writing at positions and reductions: ``index`` / ``select`` /
``index_select`` / ``gather`` (an indexed axis is fixed: cutting it would move what the indices
point at), the scatter family and ``index_put``, ``one_hot``, ``histc`` / ``bincount``,
data-shaped ops (``nonzero``, ``unique``...), ``where``; reductions (``sum``-like ones are exact
under cutting, ``mean``-like ones are not: they count every index), ``argmax``, the ops that
compare or accumulate along one axis (softmax, cumsum, sort, topk) and pooling / upsampling
(their spatial axes are new index spaces)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from leantorch.compress.graph.fx import bind, op_name, shape_of
from leantorch.compress.graph.rules.registry import axis, rule, terms_of
from leantorch.compress.graph.terms import ONE, Term, is_term

# the rules register themselves with @rule: nothing here is imported by name
__all__: list[str] = []

if TYPE_CHECKING:
    from leantorch.compress.graph.propagation import Propagator

_SUM_LIKE = {"aten.sum", "aten.linalg_vector_norm", "aten.norm", "aten.nansum", "aten.any",
             "aten.all"}
_MEAN_LIKE = {"aten.mean", "aten.amax", "aten.amin", "aten.max", "aten.min", "aten.var",
              "aten.std", "aten.var_mean", "aten.std_mean", "aten.logsumexp", "aten.prod",
              "aten.nanmean"}
_POOLS = ("aten.max_pool1d", "aten.max_pool2d", "aten.max_pool3d",
          "aten.max_pool2d_with_indices", "aten.max_pool3d_with_indices", "aten.avg_pool1d",
          "aten.avg_pool2d", "aten.avg_pool3d", "aten.adaptive_avg_pool1d",
          "aten.adaptive_avg_pool2d", "aten.adaptive_avg_pool3d", "aten._adaptive_avg_pool2d",
          "aten.adaptive_max_pool1d", "aten.adaptive_max_pool2d", "aten.upsample_nearest2d",
          "aten.upsample_bilinear2d", "aten.upsample_nearest1d", "aten.upsample_linear1d",
          "aten.upsample_bicubic2d")


@rule("aten.select")
def _select(p: Propagator, node: torch.fx.Node, val: Any, where: str) -> list[Term]:
    x = list(terms_of(p, node.args[0]))
    d = axis(node.args[1], len(x))
    p.dims.block(x[d], f"{where}: one index is selected")
    return x[:d] + x[d + 1:]


def _reduce(p: Propagator, node: torch.fx.Node, val: Any, where: str, exact: bool) -> Any:
    x = terms_of(p, node.args[0])
    args = bind(node)
    dims = args.get("dim")
    if isinstance(dims, int):
        dims = [dims]
    keep = bool(args.get("keepdim") or False)
    reduced = list(range(len(x))) if not dims else [axis(d, len(x)) for d in dims]
    for d in reduced:
        if exact:
            continue
        p.dims.mark_inexact(x[d], f"{where}: reduced by a statistic that counts every index")
    out = [ONE if i in reduced else t for i, t in enumerate(x)] if keep else \
        [t for i, t in enumerate(x) if i not in reduced]
    if isinstance(val, tuple | list):  # max.dim / var_mean: several outputs of the same shape
        return [list(out) for _ in val]
    if shape_of(val) is not None and len(out) != len(shape_of(val)):
        return p.fresh_like(val)
    return out


@rule(*_SUM_LIKE)
def _sum(p: Propagator, node: torch.fx.Node, val: Any, where: str) -> Any:
    return _reduce(p, node, val, where, exact=True)


@rule(*_MEAN_LIKE)
def _mean(p: Propagator, node: torch.fx.Node, val: Any, where: str) -> Any:
    return _reduce(p, node, val, where, exact=False)


@rule("aten.argmax", "aten.argmin")
def _argmax(p: Propagator, node: torch.fx.Node, val: Any, where: str) -> Any:
    x = terms_of(p, node.args[0])
    args = bind(node)
    if args.get("dim") is None:
        p.block_value(x, f"{where}: positions are returned")
        return p.fresh_like(val)
    d = axis(args["dim"], len(x))
    p.dims.block(x[d], f"{where}: positions along this dimension are returned")
    out = [ONE if i == d else t for i, t in enumerate(x)] if args.get("keepdim") else \
        [t for i, t in enumerate(x) if i != d]
    return out


@rule("aten.softmax", "aten._softmax", "aten.log_softmax", "aten._log_softmax",
       "aten.cumsum", "aten.cumprod", "aten.sort", "aten.topk", "aten.kthvalue")
def _along(p: Propagator, node: torch.fx.Node, val: Any, where: str) -> Any:
    x = terms_of(p, node.args[0])
    name = op_name(node.target)
    args = bind(node)
    d = axis(args.get("dim", -1) if args.get("dim") is not None else -1, len(x))
    if name in ("aten.cumsum", "aten.cumprod"):
        p.dims.mark_inexact(x[d], f"{where}: a running sum over this dimension")
    else:
        p.dims.mark_inexact(x[d], f"{where}: every index along this dimension is compared")
    if name in ("aten.topk", "aten.kthvalue"):
        out = list(x)
        out[d] = p.dims.new(shape_of(val[0])[d], f"{where}: top-k positions")
        return [out, list(out)]
    if isinstance(val, tuple | list):
        return [list(x) for _ in val]
    return list(x)


@rule(*_POOLS)
def _pool(p: Propagator, node: torch.fx.Node, val: Any, where: str) -> Any:
    x = terms_of(p, node.args[0])
    shapes = [shape_of(v) for v in val] if isinstance(val, tuple | list) else [shape_of(val)]
    lead = len(x) - _pool_rank(node)
    outs = []
    for shape in shapes:
        out = list(x[:lead]) + [p.dims.new(s, f"{where}: spatial size") for s in shape[lead:]]
        outs.append(out)
    return outs if isinstance(val, tuple | list) else outs[0]


def _pool_rank(node: torch.fx.Node) -> int:
    name = op_name(node.target)
    for digit in "123":
        if digit + "d" in name:
            return int(digit)
    return 2


@rule("aten.index")
def _index(p: Propagator, node: torch.fx.Node, val: Any, where: str) -> list[Term]:
    x = list(terms_of(p, node.args[0]))
    indices = list(node.args[1])
    shape = shape_of(val)
    used = [i for i, ix in enumerate(indices) if ix is not None]
    for i in used:
        p.dims.block(x[i], f"{where}: indexed by a tensor")
    if not used:
        return x
    contiguous = used == list(range(used[0], used[-1] + 1))
    index_rank = len(shape) - (len(x) - len(used))
    index_terms = [p.dims.new(s, f"{where}: index positions")
                   for s in shape[used[0]:used[0] + index_rank]] if contiguous else \
        [p.dims.new(s, f"{where}: index positions") for s in shape[:index_rank]]
    rest = [t for i, t in enumerate(x) if i not in used]
    if contiguous:
        return rest[:used[0]] + index_terms + rest[used[0]:]
    return index_terms + rest


@rule("aten.index_select", "aten.gather", "aten.take_along_dim")
def _index_select(p: Propagator, node: torch.fx.Node, val: Any, where: str) -> list[Term]:
    x = list(terms_of(p, node.args[0]))
    d = axis(node.args[1], len(x))
    p.dims.block(x[d], f"{where}: indexed by a tensor")
    name = op_name(node.target)
    shape = shape_of(val)
    if name == "aten.index_select":
        x[d] = p.dims.new(shape[d], f"{where}: selected positions")
        return x
    index = terms_of(p, node.args[2])
    return [x[i] if i != d and p.dims.size(x[i]) == shape[i] else index[i]
            for i in range(len(shape))]


@rule("aten.index_put", "aten.index_put_", "aten.index_add", "aten.index_add_",
       "aten.index_copy", "aten.index_copy_", "aten.scatter", "aten.scatter_",
       "aten.scatter_add", "aten.scatter_add_", "aten.index_fill", "aten.index_fill_",
       "aten.masked_scatter", "aten.masked_scatter_")
def _scatter(p: Propagator, node: torch.fx.Node, val: Any, where: str) -> list[Term]:
    x = list(terms_of(p, node.args[0]))
    name = op_name(node.target)
    shape = shape_of(val)
    if name.startswith("aten.index_put"):
        indices = list(node.args[1])
        for i, ix in enumerate(indices):
            if ix is not None and i < len(x):
                p.dims.block(x[i], f"{where}: written at tensor positions")
        values = p.value(node.args[2])
        if isinstance(values, list) and values and is_term(values[0]):
            p.broadcast_terms([x[len(indices):], values[len(values) - (len(x) - len(indices)):]]
                              if len(x) > len(indices) else [], shape[len(indices):], where) \
                if len(x) > len(indices) else None
        return x
    d = axis(node.args[1], len(x))
    p.dims.block(x[d], f"{where}: written at tensor positions")
    for arg in node.args[2:]:
        other = p.value(arg)
        if isinstance(other, list) and len(other) == len(x):
            for i in range(len(x)):
                if i != d and p.dims.size(other[i]) == p.dims.size(x[i]):
                    p.unify(other[i], x[i], where)
    return x


@rule("aten.one_hot")
def _one_hot(p: Propagator, node: torch.fx.Node, val: Any, where: str) -> list[Term]:
    x = terms_of(p, node.args[0])
    return [*x, p.dims.new(shape_of(val)[-1])]


@rule("aten.histc", "aten.bincount")
def _histc(p: Propagator, node: torch.fx.Node, val: Any, where: str) -> list[Term]:
    return p.fresh(shape_of(val))


@rule("aten.nonzero", "aten.unique", "aten._unique2", "aten.masked_select")
def _data_shaped(p: Propagator, node: torch.fx.Node, val: Any, where: str) -> Any:
    p.block_value(p.value(node.args[0]), f"{where}: output shape depends on data")
    return p.fresh_like(val, f"{where}: output shape depends on data")


@rule("aten.where")
def _where(p: Propagator, node: torch.fx.Node, val: Any, where: str) -> Any:
    if isinstance(val, tuple | list):  # where(condition): nonzero
        return _data_shaped(p, node, val, where)
    return p.broadcast(node, val, where)
