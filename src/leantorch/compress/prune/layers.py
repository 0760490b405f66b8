"""Physical removal of units: slice every tensor a group cuts, then make the modules and the
model config agree with the new shapes, and record the edit so ``leantorch.load`` can replay it.

:func:`remove_units` is the one place where tensors shrink. The dependency graph says which
indices go (:meth:`DependencyGraph.keep_indices`); this module

1. slices each tensor once per storage (tied weights stay tied), keeping dtype, device and
   ``requires_grad``;
2. updates module attributes that describe sizes: torch's own layers (``in_features``,
   ``out_channels``, ``groups`` of depthwise convs, ``num_features``, ``normalized_shape``...),
   transformers' ``Conv1D`` (``nf``, ``nx``), attention modules (head counts, KV head counts,
   ``num_key_value_groups``, ``all_head_size``, ``split_size``: read from the attention op the
   module runs), and integer size attributes of modules whose own tensors changed
   (``num_experts``, ``hidden_dim``, ``intermediate_dim``...) when the old value names exactly
   one of their changed dimensions;
3. updates a transformers config where the new sizes are uniform, and keeps the update only if
   a model rebuilt from the new config has exactly the pruned shapes (verified on the meta
   device): BERT's config, for instance, cannot say "3 heads of 8 dims in a 32-wide model" and
   is left alone;
4. records the step ``prune.resize`` (tensor shapes, attributes, config values) so that
   ``leantorch.save`` / ``leantorch.load`` rebuild the pruned model exactly.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from leantorch.compress.graph import DependencyGraph
from leantorch.errors import LeanError
from leantorch.serialize import record_step, register_step

__all__ = ["Removal", "remove_units"]

HEAD_NAMES = ("num_heads", "num_attention_heads", "n_head", "n_heads", "num_attn_heads")
KV_HEAD_NAMES = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "n_kv_head")
GROUP_NAMES = ("num_key_value_groups", "n_rep", "num_queries_per_kv")
ATTENTION_WIDTH_NAMES = ("all_head_size", "inner_dim", "split_size", "attention_dim")
# integer size attributes a module may keep about its own tensors
OWN_SIZE_NAMES = ("num_experts", "num_local_experts", "hidden_dim", "hidden_size",
                  "intermediate_dim", "intermediate_size", "embed_dim", "in_features",
                  "out_features", "num_channels", "channels", "ffn_dim", "d_model", "d_ff")


@dataclass
class Removal:
    """What :func:`remove_units` changed: tensor shapes, module attributes, config values."""

    tensors: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    attributes: dict[str, dict[str, tuple[Any, Any]]] = field(default_factory=dict)
    config: dict[str, dict[str, tuple[Any, Any]]] = field(default_factory=dict)
    units: dict[str, int] = field(default_factory=dict)  # group name -> units removed
    counts: dict[int, set[int]] = field(default_factory=dict)  # head counts: old -> new


def _check_plan(graph: DependencyGraph, removed: dict[int, Iterable[int]]) -> dict[int, list[int]]:
    plan: dict[int, list[int]] = {}
    for group_id, units in removed.items():
        group = graph.group(group_id)
        units = sorted(set(int(u) for u in units))
        if not units:
            continue
        if not group.prunable:
            raise LeanError(f"remove_units: group {group.name!r} cannot be cut: "
                            f"{'; '.join(group.reasons)}")
        if units[0] < 0 or units[-1] >= group.size:
            raise LeanError(f"remove_units: group {group.name!r} has units 0..{group.size - 1}, "
                            f"got {units}")
        if len(units) >= group.size:
            raise LeanError(f"remove_units: removing all {group.size} units of {group.name!r} "
                            "would leave an empty dimension; keep at least one")
        plan[group.id] = units
    return plan


def remove_units(model: nn.Module, graph: DependencyGraph, removed: dict[int, Iterable[int]],
                 ) -> Removal:
    """Cut ``removed[group id]`` (unit indices) from every group, in place on ``model`` (the
    model the graph was built on, or an exact copy of it). Returns what changed."""
    plan = _check_plan(graph, removed)
    result = Removal()
    if not plan:
        return result
    for group_id, units in plan.items():
        result.units[graph.group(group_id).name] = len(units)
    cut_roots = {graph.group(g).root for g in plan}
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(dict(model.named_buffers(remove_duplicate=False)))
    by_storage: dict[int, list[str]] = {}
    for name, tensor in named.items():
        by_storage.setdefault(id(tensor), []).append(name)
    new_tensors: dict[str, torch.Tensor] = {}
    for name in graph.tensor_names():
        tensor = named.get(name)
        if tensor is None:
            continue
        if tuple(tensor.shape) != graph.shape(name):
            raise LeanError(f"remove_units: {name} has shape {tuple(tensor.shape)} but the graph "
                            f"was built with {graph.shape(name)}: build the graph on this model")
        value = tensor.detach()
        changed = False
        for dim in range(tensor.dim()):
            term = graph.term_of(name, dim)
            if not cut_roots & set(graph._dims.atoms(term)):
                continue
            keep = graph.keep_indices(name, dim, plan).to(value.device)
            value = value.index_select(dim, keep)
            changed = True
        if changed:
            new_tensors[name] = value.contiguous()
    old_sizes = {n: tuple(named[n].shape) for n in new_tensors}
    for name, value in new_tensors.items():
        old = named[name]
        if isinstance(old, nn.Parameter):  # one Parameter for every name: ties survive
            value = nn.Parameter(value, requires_grad=old.requires_grad)
        for alias in by_storage[id(old)]:
            _assign(model, alias, value)
            result.tensors[alias] = (old_sizes[name], tuple(value.shape))
    _fix_attributes(model, graph, plan, result)
    _update_configs(model, result)
    record_step(model, "prune.resize", **_step_args(model, result))
    return result


def _assign(model: nn.Module, name: str, value: torch.Tensor) -> None:
    path, _, attr = name.rpartition(".")
    module = model.get_submodule(path)
    if attr in module._parameters:
        module._parameters[attr] = value
    else:
        module._buffers[attr] = value


# --------------------------------------------------------------------------- attributes
def _set(result: Removal, path: str, module: nn.Module, attr: str, value: Any) -> None:
    old = getattr(module, attr)
    if old == value:
        return
    setattr(module, attr, value)
    entry = result.attributes.setdefault(path, {})
    first = entry[attr][0] if attr in entry else old
    entry[attr] = (first, value)


def _fix_attributes(model: nn.Module, graph: DependencyGraph, plan: dict[int, list[int]],
                    result: Removal) -> None:
    changed_modules: dict[str, dict[str, tuple[tuple[int, ...], tuple[int, ...]]]] = {}
    for name, shapes in result.tensors.items():
        path, _, attr = name.rpartition(".")
        changed_modules.setdefault(path, {})[attr] = shapes
    for path, tensors in changed_modules.items():
        module = model.get_submodule(path)
        _fix_layer(path, module, tensors, graph, plan, result)
    parents = {p.rpartition(".")[0] if "." in p else "" for p in changed_modules if p}
    for path in sorted(parents - set(changed_modules)):
        _fix_own_sizes(path, model.get_submodule(path), {}, result, children=True)
    _fix_norms(model, graph, plan, result)
    _fix_attention(model, graph, plan, result)


def _fix_layer(path: str, module: nn.Module, tensors: dict[str, Any], graph: DependencyGraph,
               plan: dict[int, list[int]], result: Removal) -> None:
    m = module
    if isinstance(m, nn.Linear):
        _set(result, path, m, "out_features", m.weight.shape[0])
        _set(result, path, m, "in_features", m.weight.shape[1])
    elif isinstance(m, nn.modules.conv._ConvNd):
        groups = m.groups
        if groups > 1:
            name = _name_in_graph(graph, path, "weight")
            group_id, outer = graph.outer_atom_group(graph.term_of(name, 1 if m.transposed else 0))
            if outer == groups and group_id is not None:
                groups = groups - len(plan.get(group_id, []))
        _set(result, path, m, "groups", groups)
        if m.transposed:
            _set(result, path, m, "in_channels", m.weight.shape[0])
            _set(result, path, m, "out_channels", m.weight.shape[1] * groups)
        else:
            _set(result, path, m, "out_channels", m.weight.shape[0])
            _set(result, path, m, "in_channels", m.weight.shape[1] * groups)
    elif isinstance(m, nn.modules.batchnorm._BatchNorm | nn.modules.instancenorm._InstanceNorm):
        size = (m.weight if m.weight is not None else m.running_mean).shape[0]
        _set(result, path, m, "num_features", size)
    elif isinstance(m, nn.GroupNorm):
        _set(result, path, m, "num_channels", m.weight.shape[0])
    elif isinstance(m, nn.Embedding):
        _set(result, path, m, "embedding_dim", m.weight.shape[1])
        _set(result, path, m, "num_embeddings", m.weight.shape[0])
    elif isinstance(m, nn.RNNBase):
        _set(result, path, m, "input_size", m.weight_ih_l0.shape[1])
        _set(result, path, m, "hidden_size", m.weight_hh_l0.shape[1])
        m._init_flat_weights()  # the forward reads this cached list, not _parameters
    elif type(m).__name__ == "Conv1D" and hasattr(m, "nf"):  # transformers' (in, out) linear
        _set(result, path, m, "nx", m.weight.shape[0])
        _set(result, path, m, "nf", m.weight.shape[1])
    elif not isinstance(m, nn.LayerNorm | nn.RMSNorm):
        _fix_own_sizes(path, m, tensors, result)


def _name_in_graph(graph: DependencyGraph, path: str, attr: str) -> str:
    name = f"{path}.{attr}" if path else attr
    for candidate in graph.tensor_names():
        if candidate == name:
            return candidate
    for group in graph.groups():
        for t in group.tensors:
            if name in t.aliases:
                return t.tensor
    return name


def _fix_own_sizes(path: str, module: nn.Module, tensors: dict[str, Any],
                   result: Removal, children: bool = False) -> None:
    """Integer size attributes equal to exactly one changed dimension of the module's tensors
    (with ``children``: of its direct children's tensors, for containers such as an MLP)."""
    mapping: dict[int, set[int]] = {}
    own = {**module._parameters, **module._buffers}
    if children:
        own = {}
        tensors = {}
        for child_name, child in module.named_children():
            for name, tensor in {**child._parameters, **child._buffers}.items():
                full = f"{path}.{child_name}.{name}" if path else f"{child_name}.{name}"
                own[full] = tensor
                if full in result.tensors:
                    tensors[full] = result.tensors[full]
    for name, tensor in own.items():
        if tensor is None:
            continue
        old_shape, new_shape = tensors.get(name, (tuple(tensor.shape), tuple(tensor.shape)))
        for old, new in zip(old_shape, new_shape, strict=True):  # unchanged sizes count too:
            mapping.setdefault(old, set()).add(new)  # they make a size ambiguous
    for attr in OWN_SIZE_NAMES:
        value = getattr(module, attr, None)
        if isinstance(value, bool) or not isinstance(value, int) or value not in mapping:
            continue
        targets = mapping[value]
        if len(targets) == 1:
            _set(result, path, module, attr, next(iter(targets)))


def _fix_norms(model: nn.Module, graph: DependencyGraph, plan: dict[int, list[int]],
               result: Removal) -> None:
    for path, terms in graph.norm_terms():
        if not path:
            continue
        module = model.get_submodule(path)
        shape = tuple(graph.size_after(t, plan) for t in terms)
        if isinstance(module, nn.LayerNorm | nn.RMSNorm):
            if tuple(module.normalized_shape) != shape:
                _set(result, path, module, "normalized_shape", shape)
        else:
            for attr in ("hidden_size", "normalized_shape", "dim"):
                value = getattr(module, attr, None)
                old = tuple(graph.size_of(t) for t in terms)
                if isinstance(value, int) and len(shape) == 1 and value == old[0]:
                    _set(result, path, module, attr, shape[0])


def _fix_attention(model: nn.Module, graph: DependencyGraph, plan: dict[int, list[int]],
                   result: Removal) -> None:
    for path, heads, kv_heads in graph.attention_terms():
        old_q, new_q = graph.size_of(heads), graph.size_after(heads, plan)
        old_kv, new_kv = graph.size_of(kv_heads), graph.size_after(kv_heads, plan)
        if (old_q, old_kv) == (new_q, new_kv):
            continue
        result.counts.setdefault(old_q, set()).add(new_q)
        result.counts.setdefault(old_kv, set()).add(new_kv)
        # the attention op may run in a helper submodule; the sizes live on the nearest
        # module (or ancestor) that declares them
        for candidate in _self_and_ancestors(path):
            module = model.get_submodule(candidate)
            found = False
            for attr in HEAD_NAMES:
                if getattr(module, attr, None) == old_q and old_q != new_q:
                    _set(result, candidate, module, attr, new_q)
                    found = True
            for attr in KV_HEAD_NAMES:
                if getattr(module, attr, None) == old_kv and old_kv != new_kv:
                    _set(result, candidate, module, attr, new_kv)
                    found = True
            old_rep, new_rep = old_q // max(old_kv, 1), new_q // max(new_kv, 1)
            for attr in GROUP_NAMES:
                if getattr(module, attr, None) == old_rep and old_rep != new_rep:
                    _set(result, candidate, module, attr, new_rep)
                    found = True
            head_dim = _head_dim(module)
            if head_dim:
                for attr in ATTENTION_WIDTH_NAMES:
                    if getattr(module, attr, None) == old_q * head_dim:
                        _set(result, candidate, module, attr, new_q * head_dim)
                        found = True
            if found:
                break


def _head_dim(module: nn.Module) -> int | None:
    for attr in ("head_dim", "attention_head_size", "head_size", "d_head"):
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _self_and_ancestors(path: str) -> list[str]:
    parts = path.split(".") if path else []
    return [".".join(parts[:i]) for i in range(len(parts), -1, -1)]


# --------------------------------------------------------------------------- configs
def _transformers_roots(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Outermost transformers models inside ``model`` (with a ``config``)."""
    roots: list[tuple[str, nn.Module]] = []
    for path, module in model.named_modules():
        if any(path == r or path.startswith(r + ".") for r, _ in roots if r):
            continue
        if roots and roots[0][0] == "":
            break
        if _is_transformers(module) and getattr(module, "config", None) is not None:
            roots.append((path, module))
    return roots


def _is_transformers(module: nn.Module) -> bool:
    return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers.")
               for c in type(module).__mro__)


def _facts(module: nn.Module) -> dict[str, Any]:
    """Tensor shapes and integer size attributes of every submodule: what a model rebuilt from
    a config must reproduce."""
    out: dict[str, Any] = {}
    tensors = list(module.named_parameters(remove_duplicate=False))
    tensors += list(module.named_buffers(remove_duplicate=False))
    for name, tensor in tensors:
        out[f"{name}:ndim"] = tensor.dim()
        for d, size in enumerate(tensor.shape):
            out[f"{name}[{d}]"] = size
    for path, sub in module.named_modules():
        for attr, value in vars(sub).items():
            if attr.startswith("_") or isinstance(value, bool):
                continue
            if isinstance(value, int) or (isinstance(value, tuple) and value and
                                          all(isinstance(v, int) for v in value)):
                out[f"{path}:{attr}"] = value
    return out


def _mismatches(target: dict[str, Any], module: nn.Module, config: Any) -> set[str] | None:
    try:
        with torch.device("meta"):
            rebuilt = type(module)(config)
    except Exception:
        return None
    facts = _facts(rebuilt)
    return {k for k in set(target) | set(facts) if target.get(k) != facts.get(k)}


def _update_configs(model: nn.Module, result: Removal) -> None:
    """Set config sizes that are uniform after the cut. A value is kept only if a model rebuilt
    from the config moves closer to the pruned one and differs from it nowhere new (shapes and
    size attributes compared on the meta device): the config never says something untrue."""
    mapping: dict[int, set[int]] = {}
    for old_shape, new_shape in result.tensors.values():
        for old, new in zip(old_shape, new_shape, strict=True):
            if old != new:
                mapping.setdefault(old, set()).add(new)
    for entries in result.attributes.values():
        for old, new in entries.values():
            if isinstance(old, int) and isinstance(new, int) and old != new:
                mapping.setdefault(old, set()).add(new)
    for old, news in result.counts.items():
        mapping.setdefault(old, set()).update(news)
    for path, root in _transformers_roots(model):
        config = root.config
        target = _facts(root)
        current = _mismatches(target, root, config)
        if not current:
            continue
        candidates = {}
        for key, value in config.to_dict().items():
            if isinstance(value, bool) or not isinstance(value, int) or value not in mapping:
                continue
            if len(mapping[value]) == 1:
                candidates[key] = (value, next(iter(mapping[value])))
        # single keys first, then pairs (a head count and a KV head count move together)
        tries = [(k,) for k in candidates]
        tries += list(itertools.combinations(candidates, 2)) if len(candidates) <= 8 else []
        for keys in tries:
            if not current or any(k not in candidates for k in keys):
                continue
            trial = copy.deepcopy(config)
            for k in keys:
                setattr(trial, k, candidates[k][1])
            found = _mismatches(target, root, trial)
            if found is not None and found < current:
                for k in keys:
                    old, new = candidates.pop(k)
                    setattr(config, k, new)
                    result.config.setdefault(path, {})[k] = (old, new)
                current = found


# --------------------------------------------------------------------------- save / load
def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    return value


def _step_args(model: nn.Module, result: Removal) -> dict[str, Any]:
    return {
        "tensors": {name: list(new) for name, (_old, new) in result.tensors.items()},
        "attributes": {path: {attr: _jsonable(new) for attr, (_old, new) in entries.items()}
                       for path, entries in result.attributes.items()},
        "config": {path: {key: new for key, (_old, new) in entries.items()}
                   for path, entries in result.config.items()},
    }


@register_step("prune.resize")
def _replay_resize(model: nn.Module, tensors: dict[str, list[int]],
                   attributes: dict[str, dict[str, Any]], config: dict[str, dict[str, Any]]
                   ) -> None:
    """Give a freshly built model the shapes and sizes of a pruned one (values come after)."""
    for path, entries in config.items():
        target = model.get_submodule(path)
        for key, value in entries.items():
            setattr(target.config, key, value)
    for name, shape in tensors.items():
        path, _, attr = name.rpartition(".")
        module = model.get_submodule(path)
        old = getattr(module, attr)
        value = torch.empty(shape, dtype=old.dtype, device=old.device)
        if attr in module._parameters:
            module._parameters[attr] = nn.Parameter(value, requires_grad=old.requires_grad)
        else:
            module._buffers[attr] = value
    for path, entries in attributes.items():
        module = model.get_submodule(path)
        for attr, value in entries.items():
            if isinstance(getattr(module, attr, None), tuple) and isinstance(value, list):
                value = tuple(value)
            setattr(module, attr, value)
