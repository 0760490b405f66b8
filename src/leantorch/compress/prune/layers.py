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
   one of their changed dimensions, and a router's ``top_k`` when fewer experts remain;
3. updates a transformers config where the new sizes are uniform, and keeps the update only if
   a model rebuilt from the new config has exactly the pruned shapes and sizes (verified on the
   meta device), so ``save_pretrained`` + ``from_pretrained`` rebuild the pruned model. Keys
   tried: every integer size the cut changed uniformly (``num_local_experts`` or
   ``num_experts``, whatever the model calls it), pairs of them (heads with KV heads), unset
   sizes the model would derive (GPT-2's ``n_inner``), with a derived ``head_dim`` pinned at
   its old value (Qwen2); module attributes that copied a changed config value (Mixtral's
   ``num_experts`` on the causal-LM wrapper) follow. Where no config can say it (BERT's cannot
   say "3 heads of 8 dims in a 32-wide model"; a non-uniform cut), the config is left alone,
   the reason recorded, and that model instance's ``save_pretrained`` refuses;
4. records the step ``prune.resize`` (tensor shapes, attributes, config values, refusals) so
   that ``leantorch.save`` / ``leantorch.load`` rebuild the pruned model exactly.
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
# per-head width; T5 calls it key_value_proj_dim (d_kv in its config)
HEAD_DIM_NAMES = ("head_dim", "attention_head_size", "head_size", "d_head", "key_value_proj_dim")
ATTENTION_WIDTH_NAMES = ("all_head_size", "inner_dim", "split_size", "attention_dim")
EXPERT_COUNT_NAMES = ("num_experts", "num_local_experts")
TOP_K_NAMES = ("top_k", "num_experts_per_tok")
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
    config_roots: list[str] = field(default_factory=list)  # transformers models checked
    # transformers root path -> why its config cannot describe the pruned model
    config_gaps: dict[str, str] = field(default_factory=dict)


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
    # what a model rebuilt from the unchanged config already differs in (sizes a forward pass
    # or an earlier edit set): not the cut's doing, so not held against the new config
    baseline = {path: _mismatches(_facts(root), root, root.config)
                for path, root in _transformers_roots(model)}
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
    _update_configs(model, result, baseline)
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
    _fix_top_k(model, result)


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


def _fix_top_k(model: nn.Module, result: Removal) -> None:
    """A router that keeps fewer experts than it routes each token to would fail in
    ``topk``: it now routes every token to every remaining expert (``top_k`` on the router
    and on its MoE block, the router's parent)."""
    for path, entries in list(result.attributes.items()):
        counts = [new for attr, (_old, new) in entries.items() if attr in EXPERT_COUNT_NAMES]
        if not counts:
            continue
        experts = min(counts)
        for candidate in _self_and_ancestors(path)[:2]:
            module = model.get_submodule(candidate)
            for attr in TOP_K_NAMES:
                value = getattr(module, attr, None)
                if isinstance(value, int) and not isinstance(value, bool) and value > experts:
                    _set(result, candidate, module, attr, experts)


def _head_dim(module: nn.Module) -> int | None:
    for attr in HEAD_DIM_NAMES:
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _self_and_ancestors(path: str) -> list[str]:
    parts = path.split(".") if path else []
    return [".".join(parts[:i]) for i in range(len(parts), -1, -1)]


# --------------------------------------------------------------------------- configs
# config keys a model derives when they are unset, and the module attribute that holds the
# derived value: Qwen2 builds head_dim = hidden_size // num_attention_heads unless the config
# says otherwise, so a head cut must pin head_dim at its old value
DERIVED_KEYS = {"head_dim": "head_dim"}
# an unset (None) config size that a model derives from others (GPT-2's n_inner = 4 * n_embd)
# is tried with the new sizes if its name says it is a size
UNSET_SIZE_HINTS = ("inner", "intermediate", "ffn", "d_ff", "head_dim", "d_kv", "kv_channels",
                    "experts")
_GAP_ATTR = "_leantorch_config_gap"


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
    """Tensor shapes (``name[dim]``) and integer size attributes (``path:attr``) of every
    submodule: what a model rebuilt from a config must reproduce."""
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


def _mismatches(target: dict[str, Any], module: nn.Module, config: Any
                ) -> tuple[set[str], dict[str, Any]] | None:
    """Facts where a model rebuilt from ``config`` (on the meta device) differs from
    ``target``, and the rebuilt model's facts; None if the config does not build."""
    try:
        with torch.device("meta"):
            rebuilt = type(module)(config)
    except Exception:
        return None
    facts = _facts(rebuilt)
    return {k for k in set(target) | set(facts) if target.get(k) != facts.get(k)}, facts


def _size_mapping(result: Removal) -> dict[int, set[int]]:
    """Every size the cut changed: old -> the new sizes it became."""
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
    return mapping


def _config_options(config: Any, mapping: dict[int, set[int]]) -> list[tuple[str, Any, Any]]:
    """``(key, old value, new value)`` changes worth trying: integer keys whose value the cut
    changed uniformly, per-stage lists of them (ConvNeXt's ``hidden_sizes``), and unset size
    keys with each uniform new size."""
    uniform = {old: next(iter(news)) for old, news in mapping.items() if len(news) == 1}
    options: list[tuple[str, Any, Any]] = []
    for key, value in config.to_dict().items():
        if isinstance(value, bool):
            continue
        if isinstance(value, int) and value in uniform:
            options.append((key, value, uniform[value]))
        elif (isinstance(value, list) and value and any(v in uniform for v in value)
              and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
            options.append((key, value, [uniform.get(v, v) for v in value]))
        elif value is None and any(h in key for h in UNSET_SIZE_HINTS):
            options.extend((key, None, new) for new in sorted(set(uniform.values())))
    return options


def _pins(root: nn.Module, config: Any) -> dict[str, int]:
    """Derived config keys to pin at the value every module holds (see ``DERIVED_KEYS``)."""
    pins = {}
    for key, attr in DERIVED_KEYS.items():
        if getattr(config, key, None) is not None:
            continue
        values = {getattr(m, attr) for m in root.modules()
                  if isinstance(getattr(m, attr, None), int)
                  and not isinstance(getattr(m, attr), bool)}
        if len(values) == 1:
            pins[key] = values.pop()
    return pins


def _stale(key: str, target: dict[str, Any], facts: dict[str, Any],
           changes: dict[str, tuple[Any, Any]]) -> bool:
    """A module attribute (not a tensor size) that is a copy of a config value being changed:
    it holds the key's old value where the model rebuilt from the new config holds the new one
    (Mixtral's ``num_experts`` on the causal-LM wrapper, read by its load-balancing loss).
    Only exact copies count: a size merely equal to some changed size may mean something else
    (``num_key_value_groups`` 2 is not a head count 2)."""
    if "[" in key or key.endswith(":ndim") or ":" not in key:
        return False
    old, new = target.get(key), facts.get(key)
    return any(old == was and new == now for was, now in changes.values()
               if isinstance(was, int) and not isinstance(old, bool))


def _update_configs(model: nn.Module, result: Removal,
                    baseline: dict[str, tuple[set[str], dict[str, Any]] | None]) -> None:
    """Set config sizes that are uniform after the cut. A change is kept only if a model
    rebuilt from the config moves closer to the pruned one and differs from it nowhere new
    (shapes and size attributes compared on the meta device): the config never says something
    untrue. Module attributes that merely copied a changed config value are brought along.
    Where differences remain, the config cannot describe the pruned model: the reason goes to
    ``result.config_gaps`` and the root's ``save_pretrained`` refuses (see :func:`_mark_gap`)."""
    mapping = _size_mapping(result)
    for path, root in _transformers_roots(model):
        config = root.config
        before = baseline.get(path)
        noise = before[0] if before is not None else set()
        target = _facts(root)
        first = _mismatches(target, root, config)
        if first is None:  # the class does not build from its config: nothing to say
            continue
        result.config_roots.append(path)
        current, facts = first[0] - noise, first[1]
        options = _config_options(config, mapping) if current else []
        pins = _pins(root, config)
        tries: list[tuple[tuple[str, Any, Any], ...]] = [(o,) for o in options]
        if len(options) <= 12:  # a head count and a KV head count move together
            tries += [(a, b) for a, b in itertools.combinations(options, 2) if a[0] != b[0]]
        done: set[str] = set()
        prefix = f"{path}." if path else ""
        for combo in tries:
            retry_with_pins = False
            if not current:
                break
            if any(key in done for key, _, _ in combo):
                continue
            for extra in ({}, pins):
                if extra and not retry_with_pins:
                    break
                changes = {key: (old, new) for key, old, new in combo}
                changes.update({k: (getattr(config, k, None), v) for k, v in extra.items()
                                if k not in changes})
                trial = copy.deepcopy(config)
                try:
                    for key, (_, value) in changes.items():
                        setattr(trial, key, value)
                except Exception:  # a typed config field that refuses the value
                    continue
                found = _mismatches(target, root, trial)
                # pins help only where the trial moved a derived size (a rebuild per try)
                retry_with_pins = bool(pins) and (found is None or any(
                    k.endswith(f":{DERIVED_KEYS[pin]}") for pin in pins for k in found[0]))
                if found is None:
                    continue
                stale = {k for k in found[0] - noise if _stale(k, target, found[1], changes)}
                remaining = found[0] - noise - stale
                if not remaining < current:
                    continue
                for key, (old, value) in changes.items():
                    setattr(config, key, value)
                    result.config.setdefault(path, {})[key] = (old, value)
                    done.add(key)
                for key in stale:
                    sub, _, attr = key.partition(":")
                    _set(result, prefix + sub if sub else path, root.get_submodule(sub), attr,
                         found[1][key])
                target = _facts(root)
                current, facts = remaining, found[1]
                break
        if current:
            reason = _gap_reason(root, current, target, facts)
            result.config_gaps[path] = reason
            _mark_gap(root, reason)
        elif _GAP_ATTR in root.__dict__:
            # an earlier cut left a gap: it closes only if the config now describes it all
            now = _mismatches(target, root, config)
            if now is not None and not now[0]:
                _clear_gap(root)
            else:
                result.config_gaps[path] = root.__dict__[_GAP_ATTR]


def _gap_reason(root: nn.Module, current: set[str], target: dict[str, Any],
                facts: dict[str, Any]) -> str:
    shapes = sorted(k for k in current if "[" in k)
    examples = (shapes or sorted(current))[:2]
    said = "; ".join(f"{k} is {target.get(k)} in the pruned model but {facts.get(k)} in one "
                     "built from the config" for k in examples)
    return (f"{type(root.config).__name__} cannot describe the pruned {type(root).__name__} "
            f"({len(current)} sizes differ from a model built from it, e.g. {said})")


class _RefuseSavePretrained:
    """Stands in for one model instance's ``save_pretrained``: raises with the reason. A plain
    picklable object (not a bound method), so copies and pickles of the model keep it."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        raise LeanError(
            f"save_pretrained: {self.reason}, so a folder written now would not load with "
            "from_pretrained; nothing was written. Save with leantorch.save(model, path) and "
            "rebuild with leantorch.load(path), which replay the cut")


def _mark_gap(root: nn.Module, reason: str) -> None:
    """Make this instance's ``save_pretrained`` (not the class's) refuse with ``reason``."""
    root.__dict__[_GAP_ATTR] = reason
    root.__dict__["save_pretrained"] = _RefuseSavePretrained(reason)


def _clear_gap(root: nn.Module) -> None:
    root.__dict__.pop(_GAP_ATTR, None)
    root.__dict__.pop("save_pretrained", None)


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
        "gaps": {path: root.__dict__.get(_GAP_ATTR) for path, root in _transformers_roots(model)},
    }


@register_step("prune.resize")
def _replay_resize(model: nn.Module, tensors: dict[str, list[int]],
                   attributes: dict[str, dict[str, Any]], config: dict[str, dict[str, Any]],
                   gaps: dict[str, str | None] | None = None) -> None:
    """Give a freshly built model the shapes and sizes of a pruned one (values come after),
    and the same ``save_pretrained`` refusal where its config cannot describe them."""
    for path, reason in (gaps or {}).items():
        if reason is None:
            _clear_gap(model.get_submodule(path))
        else:
            _mark_gap(model.get_submodule(path), reason)
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
