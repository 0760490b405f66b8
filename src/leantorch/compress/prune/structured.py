"""Structured pruning: remove whole channels, attention heads, MLP neurons, embedding width or
experts, so the result is an ordinary dense model with smaller tensors.

Three separate pieces, in the spirit of Torch-Pruning's design:

- the graph (:mod:`leantorch.compress.graph`) says which dimensions are coupled (the groups);
- the importance (:mod:`leantorch.compress.prune.importance`) scores each unit of a group;
- the strategy (here, :func:`plan_removal`) decides how many units each group loses: a
  per-group ratio (default), or one global ranking per kind of unit (``global_ranking``),
  with per-module overrides, ``round_to`` (the kept size of each cut tensor dimension is a
  multiple of it, e.g. 8 for SIMD-friendly widths), a ceiling ``max_ratio`` so no group
  collapses, and modules to ``exclude`` (their own output size is kept).

:func:`structured` (registered as ``prune.structured``; also exported as ``prune_structured``) runs the three and then
:func:`leantorch.compress.prune.layers.remove_units`, and checks that the pruned model runs
and gives outputs of the original shapes (in eval and training mode). :func:`mask_units` is
the readable reference: it zeroes the same slices in place of removing them; for groups marked
``exact`` the two models compute the same function.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from leantorch import validate
from leantorch.compress.change import Change, _patterns, apply_transform
from leantorch.compress.graph import (
    DependencyGraph,
    Group,
    _module_path_stack,
    build_graph,
    default_inputs,
)
from leantorch.compress.prune.importance import IMPORTANCES, check_loss_fn, score_groups
from leantorch.compress.prune.layers import remove_units
from leantorch.compress.registry import register_transform
from leantorch.errors import LeanError, LeanTypeError, describe

__all__ = ["KINDS", "mask_units", "plan_removal", "prune_structured"]

KINDS = ("channels", "heads", "kv_heads", "neurons", "width", "experts")
_OWN_OUTPUT_ROLES = ("out", "param", "norm")


def _units(units: str | Sequence[str]) -> list[str]:
    chosen = [units] if isinstance(units, str) else list(units)
    if chosen == ["all"]:
        return list(KINDS)
    unknown = [u for u in chosen if u not in KINDS]
    if unknown or not chosen:
        raise LeanError(f"prune.structured: units must be among {', '.join(KINDS)} (or 'all'), "
                        f"got {describe(units)}")
    return chosen


def _matches(path: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(path, p) for p in patterns)


def _excluded(group: Group, patterns: Sequence[str]) -> str | None:
    """The excluded module whose own output size this group would change, if any."""
    for member in group.tensors:
        if member.role in _OWN_OUTPUT_ROLES and _matches(member.module, patterns):
            return member.module
    return None


def _override(group: Group, per_layer: dict[str, float]) -> float | None:
    producers = {m.module for m in group.tensors if m.role in _OWN_OUTPUT_ROLES}
    for pattern, ratio in per_layer.items():
        if fnmatch.fnmatchcase(group.name, pattern) or any(
                fnmatch.fnmatchcase(m, pattern) for m in producers):
            return ratio
    return None


def _kept_size(group: Group, keep: int, round_to: int | None) -> int:
    """The smallest kept count >= keep whose widest cut dimension is a multiple of round_to."""
    keep = max(1, min(group.size, keep))
    if not round_to:
        return keep
    for k in range(keep, group.size + 1):
        if (k * group.unit_width) % round_to == 0:
            return k
    return group.size


def _to_remove(size: int, ratio: float) -> int:
    """Units to remove so that ``floor((1 - ratio) * size)`` remain (Torch-Pruning's rounding:
    30% of 12 heads keeps 8)."""
    return size - math.floor((1 - ratio) * size + 1e-9) if ratio > 0 else 0


def plan_removal(
    groups: Sequence[Group],
    scores: dict[int, torch.Tensor],
    ratio: float,
    *,
    global_ranking: bool = False,
    per_layer: dict[str, float] | None = None,
    round_to: int | None = None,
    max_ratio: float = 0.9,
) -> dict[int, list[int]]:
    """Units to remove ``{group id: sorted unit indices}``: the lowest-scored units, ``ratio``
    of each group (``floor((1 - ratio) * size)`` units stay), or, with ``global_ranking``, of
    all units of each kind ranked together by scores normalised by their group's mean; never
    more than ``max_ratio`` of a group and never all of it; kept counts rounded up so cut
    dimensions are multiples of ``round_to``."""
    per_layer = per_layer or {}
    targets: dict[int, int] = {}  # group id -> units to remove
    pooled: dict[str, list[Group]] = {}
    for g in groups:
        override = _override(g, per_layer)
        group_ratio = ratio if override is None else override
        if global_ranking and override is None:
            pooled.setdefault(g.kind, []).append(g)
        else:
            targets[g.id] = _to_remove(g.size, group_ratio)
    for members in pooled.values():
        entries = []
        for g in members:
            s = scores[g.id]
            normalised = s / s.mean().clamp_min(1e-300)
            entries.extend((float(v), g.id, i) for i, v in enumerate(normalised))
        budget = _to_remove(len(entries), ratio)
        counts = dict.fromkeys((g.id for g in members), 0)
        caps = {g.id: min(g.size - 1, math.floor(max_ratio * g.size + 1e-9)) for g in members}
        for _value, gid, _i in sorted(entries):
            if budget <= 0:
                break
            if counts[gid] < caps[gid]:
                counts[gid] += 1
                budget -= 1
        targets.update(counts)
    plan = {}
    by_id = {g.id: g for g in groups}
    for gid, remove in targets.items():
        g = by_id[gid]
        remove = min(remove, g.size - 1, math.floor(max_ratio * g.size + 1e-9))
        keep = _kept_size(g, g.size - remove, round_to)
        remove = g.size - keep
        if remove <= 0:
            continue
        order = torch.argsort(scores[gid], stable=True)
        plan[gid] = sorted(int(u) for u in order[:remove])
    return plan


def mask_units(model: nn.Module, graph: DependencyGraph, removed: dict[int, Iterable[int]]
               ) -> nn.Module:
    """The reference: zero (in place) every slice the removal would cut, and return ``model``.
    For ``exact`` groups this model computes what the physically pruned one does."""
    with torch.no_grad():
        for group_id, units in removed.items():
            for name, dim, indices in graph.group(group_id).slices(units):
                path, _, attr = name.rpartition(".")
                tensor = getattr(model.get_submodule(path), attr)
                tensor.index_fill_(dim, indices.to(tensor.device), 0)
    return model


def _outputs(model: nn.Module, inputs: Any, training: bool = False) -> Any:
    """The model's output on ``inputs`` in eval mode (``training``: in training mode, with the
    buffers a training forward updates, BatchNorm statistics, put back and the RNG forked, so
    that checking a model never changes it); the model's mode is restored."""
    args, kwargs = default_inputs(model, inputs)
    was_training = model.training
    saved = {n: b.clone() for n, b in model.named_buffers()} if training else {}
    model.train(training)
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[], enabled=training):
            return model(*args, **kwargs)
    finally:
        model.train(was_training)
        for name, buffer in model.named_buffers():
            if name in saved and saved[name].shape == buffer.shape:
                buffer.copy_(saved[name])


def _shapes(output: Any) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor)]


def _checked_shapes(model: nn.Module, inputs: Any, training: bool, graph: DependencyGraph,
                    plan: dict[int, list[int]]) -> list[tuple[int, ...]]:
    """Output shapes of the pruned model; if it no longer runs, an error naming the module that
    failed and the cut groups reaching into it (to leave whole with ``per_layer`` / ``exclude``)."""
    stack, handles = _module_path_stack(model)
    try:
        return _shapes(_outputs(model, inputs, training))
    except Exception as error:
        raise _no_longer_runs(model, graph, plan, stack[-1] if stack else None, training,
                              error) from error
    finally:
        for handle in handles:
            handle.remove()


def _no_longer_runs(model: nn.Module, graph: DependencyGraph, plan: dict[int, list[int]],
                    path: str | None, training: bool, error: Exception) -> LeanError:
    mode = " in training mode" if training else ""
    text = " ".join(str(error).split())[:300]
    if path is None:
        return LeanError(f"prune.structured: the pruned model no longer runs{mode} "
                         f"({type(error).__name__}: {text}); some module keeps a size the graph "
                         "cannot update: leave its groups alone with exclude=[...] or "
                         "per_layer={...: 0}")
    kind = type(model.get_submodule(path)).__name__
    where = f"the module at {path!r} ({kind})" if path else f"the model's own forward ({kind})"
    # the size may be hard-coded around the failing module (a split in its parent feeding it
    # the wrong width): the innermost enclosing module that computes a cut group names them
    parts = path.split(".") if path else []
    scope, groups = path, []
    for depth in range(len(parts), -1, -1):
        scope = ".".join(parts[:depth])
        groups = [g for g in graph.groups_in(scope) if g.id in plan]
        if groups:
            break
    there = "there" if scope == path else \
        (f"in {scope!r} around it" if scope else "in the model's own forward")
    names = ", ".join(f"{g.name!r}: 0" for g in groups)
    producers = sorted({t.module for g in groups for t in g.tensors
                        if t.role in _OWN_OUTPUT_ROLES})
    return LeanError(
        f"prune.structured: the pruned model no longer runs{mode}: {where} raised "
        f"{type(error).__name__}: {text}. Module code keeps a size the graph cannot update (a "
        "constant in a reshape, view or split, a size stored outside its tensors); the groups "
        f"cut {there} are {', '.join(repr(g.name) for g in groups)}: leave them whole with "
        f"per_layer={{{names}}} or exclude={producers!r}")


@register_transform("prune.structured")
def structured(
    model: nn.Module,
    *,
    ratio: float = 0.3,
    units: str | Sequence[str] = ("channels", "heads", "neurons"),
    importance: str | Callable[..., dict[int, torch.Tensor]] = "l2",
    global_ranking: bool = False,
    per_layer: dict[str, float] | None = None,
    round_to: int | None = None,
    exclude: str | Sequence[str] | None = None,
    max_ratio: float = 0.9,
    leaf_modules: Sequence[str] | None = None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    seed: int = 0,
    example_inputs: Any = None,
    calibration: Sequence[Any] | None = None,
    inplace: bool = False,
    ignore: str | Sequence[str] | None = None,
) -> tuple[nn.Module, Change]:
    """Remove ``ratio`` of the units of every prunable group whose kind is in ``units``.

    Args:
        ratio: fraction of each group's units to remove (of each kind's units with
            ``global_ranking``), in [0, 1). 0 returns an identical model.
        units: kinds to cut: ``"channels"``, ``"heads"``, ``"kv_heads"``, ``"neurons"``,
            ``"width"``, ``"experts"``, or ``"all"``.
        importance: ``"l1"``, ``"l2"``, ``"bn"``, ``"taylor"`` (needs ``calibration``),
            ``"random"``, or a callable (see :func:`score_groups`).
        global_ranking: rank units of a kind across all groups instead of per group.
        per_layer: ``{glob pattern: ratio}`` overriding ``ratio`` for groups whose name, or a
            module whose output size the group sets, matches (first match wins; 0 leaves
            them alone).
        round_to: keep cut dimensions at multiples of this (8 for vector-friendly widths).
        exclude: module path globs (``fnmatch``, as every transform's ``exclude``) whose own
            output size must not change (a classifier): groups that would resize them are
            left whole, with the reason in ``change.skipped``.
        max_ratio: the most any one group may lose.
        leaf_modules: modules the graph treats as black boxes (see ``build_graph``).
        loss_fn: ``loss_fn(output, batch) -> scalar`` for ``"taylor"`` (see
            :func:`leantorch.compress.prune.importance.taylor_saliency`; a callable of another
            arity is refused).
        seed: seeds the ``"random"`` scores and the random output projection ``"taylor"``
            differentiates when neither ``loss_fn`` nor the model's ``.loss`` applies.
        example_inputs: inputs to trace the model on (default: the first calibration batch).
        calibration: model inputs for ``"taylor"`` (a list of tuples or dicts).
        ignore: the old name of ``exclude``, accepted for one release with a
            :class:`DeprecationWarning`.

    Returns ``(pruned model, Change)``; ``change.details`` lists every group cut (units before
    and after, and ``removed``: the unit indices per group name), the transformers config
    values updated (``config``), and for transformers models ``config_describes_model``:
    where False (GPT-2 or BERT heads: the head width is derived from a fixed model width),
    ``config_gaps`` says why and that model's
    ``save_pretrained`` refuses (``leantorch.save``/``load`` replay the cut instead);
    ``change.skipped`` the groups left alone and why, and, under their module's
    path, the tensors no traced forward (eval or training mode) reads, which are never cut.
    The pruned model is checked in eval mode and, where the original's training forward runs
    on ``example_inputs``, in training mode; if it no longer runs, the error names the module
    that failed and the groups to leave whole.
    """
    ratio = validate.ratio("prune.structured", "ratio", ratio)
    max_ratio = float(max_ratio)
    kinds = _units(units)
    if isinstance(importance, str) and importance not in IMPORTANCES:
        raise LeanError(f"prune.structured: importance must be one of {', '.join(IMPORTANCES)} "
                        f"or a callable, got {importance!r}")
    if round_to is not None:
        validate.positive_int("prune.structured", "round_to", round_to)
    per_layer = dict(per_layer or {})
    for pattern, value in per_layer.items():
        if not isinstance(pattern, str):
            raise LeanTypeError(f"prune.structured: per_layer keys must be glob patterns, got "
                                f"{describe(pattern)}")
        validate.ratio("prune.structured", f"per_layer[{pattern!r}]", value)
    if ignore is not None:
        if exclude is not None:
            raise LeanError(f"prune.structured: got both exclude={describe(exclude)} and its "
                            f"old name ignore={describe(ignore)}; give exclude= only")
        warnings.warn("prune.structured: ignore= is now called exclude=; ignore= will be "
                      "removed in the next release", DeprecationWarning, stacklevel=2)
        exclude = ignore
    exclude_patterns = _patterns("exclude", exclude) or []
    loss_fn = check_loss_fn("prune.structured", loss_fn)
    inputs = example_inputs if example_inputs is not None else \
        (calibration[0] if calibration else None)
    if inputs is None:
        raise LeanError("prune.structured needs example_inputs (or calibration data) to trace "
                        "the model's dependency graph")
    if importance == "taylor" and not calibration:
        raise LeanError("prune.structured: importance='taylor' needs calibration data (a list "
                        "of model inputs)")
    params = {"ratio": ratio, "units": kinds, "importance": importance if isinstance(
        importance, str) else getattr(importance, "__name__", "callable"),
        "global_ranking": global_ranking, "per_layer": per_layer, "round_to": round_to,
        "exclude": exclude_patterns, "max_ratio": max_ratio}

    def edit(target: nn.Module, change: Change) -> None:
        graph = build_graph(target, inputs, leaf_modules=leaf_modules)
        unseen: dict[str, list[str]] = {}
        for name in graph.unseen:
            module, _, attr = name.rpartition(".")
            unseen.setdefault(module, []).append(attr)
        for module, attrs in unseen.items():
            reason = graph.unseen[f"{module}.{attrs[0]}" if module else attrs[0]]
            change.skipped[module or "(model)"] = f"{', '.join(attrs)} left whole: {reason}"
        candidates = []
        for g in graph.groups(kind=kinds):
            if not g.prunable:
                change.skipped[g.name] = "; ".join(g.reasons)
                continue
            module = _excluded(g, exclude_patterns)
            if module is not None:
                change.skipped[g.name] = f"would resize excluded module {module}"
                continue
            candidates.append(g)
        if ratio == 0 and not any(per_layer.values()):
            change.details["groups"] = {}
            return
        scores, notes = score_groups(target, graph, candidates, importance,
                                     calibration=calibration, loss_fn=loss_fn, seed=seed)
        plan = plan_removal(candidates, scores, ratio, global_ranking=global_ranking,
                            per_layer=per_layer, round_to=round_to, max_ratio=max_ratio)
        reference = {False: _shapes(_outputs(target, inputs))}
        # the training-mode forward is checked too, where the model has one that runs on
        # these inputs (not, e.g., one that needs labels)
        with contextlib.suppress(Exception):
            reference[True] = _shapes(_outputs(target, inputs, training=True))
        removal = remove_units(target, graph, plan)
        for training, shapes in reference.items():
            after = _checked_shapes(target, inputs, training, graph, plan)
            if after != shapes:
                mode = " (training mode)" if training else ""
                raise LeanError(f"prune.structured: output shapes{mode} changed from {shapes} "
                                f"to {after}; this is a bug in the dependency graph, please "
                                "report it")
        by_id = {g.id: g for g in candidates}
        change.details["groups"] = {
            by_id[gid].name: {"kind": by_id[gid].kind, "before": by_id[gid].size,
                              "after": by_id[gid].size - len(u), "exact": by_id[gid].exact}
            for gid, u in plan.items()}
        change.details["removed"] = {by_id[gid].name: units for gid, units in plan.items()}
        change.details["config"] = {p: {k: list(v) for k, v in e.items()}
                                    for p, e in removal.config.items()}
        if removal.config_roots:  # transformers models: does save_pretrained round-trip?
            change.details["config_describes_model"] = not removal.config_gaps
        if removal.config_gaps:  # save_pretrained refuses on these (layers._mark_gap)
            change.details["config_gaps"] = dict(removal.config_gaps)
        change.details.update(notes)
        change.replaced.extend(sorted({name.rpartition(".")[0] for name in removal.tensors}))

    return apply_transform("prune.structured", model, edit, params=params,
                           example_inputs=example_inputs, inplace=inplace)


# the family-prefixed public name (registry names are <family>.<function name>; see
# leantorch.compress.registry)
prune_structured = structured
