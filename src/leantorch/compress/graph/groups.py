"""Groups: the coupled dimensions of a model, read off the facts the propagation collected.

:class:`DependencyGraph` takes a finished :class:`~.propagation.Propagator`. Every dimension of
every parameter and buffer is a member; members whose terms share a root atom form one
:class:`Group` (a member whose axis is a product or a sum joins the group of each atom in it,
with the exact indices each unit occupies: :class:`TensorSlice`). A group's kind comes from the
tags on its atom (heads, KV heads, experts, per-head sizes, kernels, gates) or from the modules
it touches (channels, width, neurons); it is prunable when no reason blocks its atom. The graph
also answers what pruning needs next: the indices kept in any tensor for a set of removed units
(:meth:`DependencyGraph.keep_indices`), the head and norm axes whose sizes a module's
attributes must follow, and the removable residual branches (:mod:`.sublayers`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from leantorch.compress.graph.propagation import Propagator
from leantorch.compress.graph.rules.attention_moe import couple_experts
from leantorch.compress.graph.sublayers import Sublayer, find_sublayers, is_norm
from leantorch.compress.graph.terms import Atom, Term, product
from leantorch.errors import LeanError

__all__ = ["DependencyGraph", "Group", "Sublayer", "TensorSlice"]


@dataclass
class TensorSlice:
    """One tensor a group cuts: ``tensor`` (state-dict name; ``aliases`` share its storage), its
    dimension ``dim``, the module owning it and its role there (``"out"``: the module's output
    features, ``"in"``: its input features, ``"norm"``, ``"bias"``, ``"buffer"``, ``"param"``)."""

    tensor: str
    dim: int
    module: str
    role: str
    size: int  # length of the dimension
    aliases: tuple[str, ...] = ()
    unit_of: torch.Tensor | None = field(default=None, repr=False)  # (size,) unit of each index

    def indices(self, units: Iterable[int]) -> torch.Tensor:
        """Indices along ``dim`` that the given units occupy (sorted)."""
        wanted = torch.as_tensor(sorted(set(int(u) for u in units)), dtype=torch.long)
        return torch.isin(self.unit_of, wanted).nonzero().flatten()

    def pattern(self) -> str:
        """How a unit maps to indices, e.g. ``"unit u -> 8u..8u+7"``."""
        first = self.indices([0]).tolist()
        per_unit = len(first)
        if per_unit == 0:
            return "?"
        if first == list(range(first[0], first[0] + per_unit)):
            if per_unit == 1:
                return "unit u -> index u" if first[0] == 0 else f"unit u -> index {first[0]}+u"
            return f"unit u -> {per_unit} indices {per_unit}u..{per_unit}u+{per_unit - 1}" \
                if first[0] == 0 else f"unit u -> {per_unit} consecutive indices from {first[0]}"
        return f"unit u -> {per_unit} strided indices (unit 0: {first[:4]}...)"


@dataclass
class Group:
    """A set of coupled tensor dimensions: removing unit ``u`` removes the indices of ``u`` from
    every tensor in ``tensors`` at once, and the model stays valid.

    ``kind``: ``"heads"`` (attention heads; under grouped KV, the query heads within each KV
    group), ``"kv_heads"`` (a KV head with its query heads), ``"neurons"`` (hidden units of an
    MLP, gated pairs included), ``"channels"`` (CNN channels, residual stages included),
    ``"width"`` (a transformer's embedding / residual width), ``"experts"``, ``"head_dim"``
    (the size of each head: never cut, listed for completeness), ``"kernel"`` (a conv
    kernel window: never cut), ``"gates"`` (an LSTM's four gate blocks: never cut) or
    ``"other"``.
    """

    id: int
    kind: str
    name: str
    size: int  # number of units
    tensors: list[TensorSlice]
    prunable: bool
    reasons: list[str]
    exact: bool
    inexact_reasons: list[str]
    unit_width: int  # indices one unit occupies in its widest producer
    modules: list[str]
    root: int = field(repr=False, default=-1)

    def slices(self, units: Iterable[int]) -> list[tuple[str, int, torch.Tensor]]:
        """``(tensor name, dim, indices)`` to remove for these units (aliases not repeated)."""
        units = list(units)
        for u in units:
            if not 0 <= int(u) < self.size:
                raise LeanError(f"group {self.name!r} has units 0..{self.size - 1}, got {u!r}")
        return [(t.tensor, t.dim, t.indices(units)) for t in self.tensors]

    def __str__(self) -> str:
        state = "prunable" if self.prunable else f"fixed ({'; '.join(self.reasons)})"
        exact = "" if self.exact else f" [not exact: {'; '.join(self.inexact_reasons)}]"
        lines = [f"group {self.id} {self.name}: {self.size} units, {state}{exact}"]
        for t in self.tensors:
            lines.append(f"  {t.tensor} dim {t.dim} ({t.role}, size {t.size}): {t.pattern()}")
        return "\n".join(lines)


def _role(module: nn.Module, tensor_name: str, dim: int) -> str:
    """How a module uses a dimension of one of its own tensors."""
    if isinstance(module, nn.Linear) or type(module).__name__ == "Linear":
        if tensor_name == "weight":
            return "out" if dim == 0 else "in"
        return "bias"
    if type(module).__name__ == "Conv1D":  # transformers' (in, out) linear
        if tensor_name == "weight":
            return "out" if dim == 1 else "in"
        return "bias"
    if isinstance(module, nn.modules.conv._ConvNd):
        if tensor_name == "weight":
            if module.transposed:
                return "in" if dim == 0 else ("out" if dim == 1 else "kernel")
            return "out" if dim == 0 else ("in" if dim == 1 else "kernel")
        return "bias"
    if isinstance(module, nn.Embedding):
        return "out" if dim == 1 else "rows"
    if isinstance(module, nn.RNNBase):  # weight_ih / weight_hh: (gates x hidden, in / hidden)
        if tensor_name.startswith("weight"):
            return "out" if dim == 0 else "in"
        return "bias"
    if is_norm(module):
        if tensor_name in ("weight", "bias"):
            return "norm"
        return "buffer"
    if tensor_name in dict(module.named_buffers(recurse=False)):
        return "buffer"
    return "param"


@dataclass
class _Member:
    tensor: str
    dim: int
    term: Term
    module: str
    role: str
    aliases: tuple[str, ...]


class DependencyGraph:
    """The coupled dimensions of a model (see the module docstring). Build it with
    :func:`build_graph`; it holds no reference to the model's tensors' values."""

    def __init__(self, model: nn.Module, propagator: Propagator, program: Any,
                 leaf_modules: Sequence[str], unseen_reason: str = "no traced forward reads it",
                 modes: Sequence[str] = ("eval",)) -> None:
        self.program = program
        self.leaf_modules = list(leaf_modules)
        self.modes = list(modes)  # the modes whose traces are merged in this graph
        self._dims = propagator.dims
        self._attention = propagator.attention
        self._scopes = propagator.scopes
        self._norms = propagator.norms
        self._members: list[_Member] = []
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._module_types: dict[str, str] = {}
        aliases: dict[int, list[str]] = {}
        named = dict(model.named_parameters(remove_duplicate=False))
        named.update(dict(model.named_buffers(remove_duplicate=False)))
        for name, tensor in named.items():
            aliases.setdefault(id(tensor), []).append(name)
        for path, module in model.named_modules():
            self._module_types[path] = type(module).__name__
        couple_experts(model, propagator)
        # both traces record the same attention ops and norms: keep each once
        resolve = propagator.dims.resolve
        self._attention = list({(a["module"], resolve(a["heads"]), resolve(a["kv_heads"])): a
                                for a in self._attention}.values())
        self._norms = list({(m, tuple(resolve(t) for t in terms)): (m, terms)
                            for m, terms in self._norms}.values())
        self.unseen = self._unseen(model, named, aliases, propagator, unseen_reason)
        seen: set[int] = set()
        for name, terms in propagator.param_terms.items():
            tensor = named.get(name)
            if tensor is None or id(tensor) in seen or name in self.unseen:
                continue  # tied tensors: one entry per storage, the other names as aliases
            seen.add(id(tensor))
            names = aliases[id(tensor)]
            module_path, _, tensor_name = name.rpartition(".")
            module = model.get_submodule(module_path)
            self._shapes[name] = tuple(tensor.shape)
            for d, term in enumerate(terms):
                role = _role(module, tensor_name, d)
                self._members.append(_Member(name, d, term, module_path, role,
                                             tuple(n for n in names if n != name)))
        self._groups = self._make_groups()
        self._sublayers = find_sublayers(program, propagator, model)

    # ---- construction
    @staticmethod
    def _unseen(model: nn.Module, named: dict[str, torch.Tensor], aliases: dict[int, list[str]],
                p: Propagator, reason: str) -> dict[str, str]:
        """Tensors no traced forward reads (a training-only head the training trace did not
        reach, a dead parameter): the graph cannot place their dimensions, so they are never
        cut. A module that also holds tensors the trace did see keeps those whole as well
        (cutting a Linear's weight but not its unread bias would leave it inconsistent)."""
        unseen: dict[str, str] = {}
        for name in p.param_terms:
            tensor = named.get(name)
            if tensor is None or tensor.dim() == 0:
                continue
            if not any(n in p.used for n in aliases.get(id(tensor), [name])):
                unseen[name] = reason
        unseen_params = {n for n in unseen if isinstance(named[n], nn.Parameter)}
        for name in unseen_params:
            module = name.rpartition(".")[0]
            why = (f"{module or '(model)'} also holds {name}, which {reason}: its tensors are "
                   "kept whole")
            for other, terms in p.param_terms.items():
                if other not in unseen and other.rpartition(".")[0] == module:
                    for term in terms:
                        p.dims.block(term, why)
        return unseen

    def _make_groups(self) -> list[Group]:
        dims = self._dims
        by_root: dict[int, list[_Member]] = {}
        order: list[int] = []
        resolved: dict[int, Term] = {}
        for index, member in enumerate(self._members):
            term = dims.resolve(member.term)
            resolved[index] = term
            for root in dict.fromkeys(dims.atoms(term)):
                if root not in by_root:
                    by_root[root] = []
                    order.append(root)
                by_root[root].append(member)
        groups = []
        for root in order:
            members = by_root[root]
            reasons = list(dims.blocked.get(root, []))
            slices = []
            for member in members:
                term = dims.resolve(member.term)
                if dims.repeats_in_product(term, root):
                    reasons.append(f"{member.tensor} dim {member.dim} holds this index space "
                                   "twice")
                    unit_of = torch.full((dims.size(term),), -1, dtype=torch.long)
                else:
                    unit_of = dims.unit_map(term, root)
                slices.append(TensorSlice(member.tensor, member.dim, member.module, member.role,
                                          dims.size(term), member.aliases, unit_of))
            if all(m.role == "buffer" for m in members):
                reasons.append("only buffers, no parameter, live in this dimension")
            tags = dims.tags.get(root, set())
            kind = self._kind(tags, members)
            modules = list(dict.fromkeys(m.module for m in members))
            producers = [m.module for m in members if m.role in ("out", "param")] or \
                [m.module for m in members if m.role == "norm"]
            suffix = "" if producers else " (input)"
            producers = producers or modules
            inexact = list(dims.inexact.get(root, []))
            widths = [int((s.unit_of == 0).sum()) for s in slices if s.role in ("out", "param")]
            widths = widths or [int((s.unit_of == 0).sum()) for s in slices]
            groups.append(Group(
                id=len(groups), kind=kind, name=f"{kind} {_common_prefix(producers) or '(model)'}{suffix}",
                size=dims.sizes[root], tensors=slices, prunable=not reasons, reasons=reasons,
                exact=not inexact, inexact_reasons=inexact, unit_width=max(widths),
                modules=modules, root=root))
        _disambiguate_names(groups)
        return groups

    def _kind(self, tags: set[str], members: list[_Member]) -> str:
        if "experts" in tags:
            return "experts"
        if "kv_heads" in tags:
            return "kv_heads"
        if "heads" in tags:
            return "heads"
        if "head_dim" in tags:
            return "head_dim"
        if "kernel" in tags:
            return "kernel"
        if "gates" in tags:
            return "gates"
        types = [self._module_types.get(m.module, "") for m in members]
        convs = len({m.module for m, t in zip(members, types, strict=True)
                     if t.startswith("Conv") and t != "Conv1D"})
        layer_norm = any(m.role == "norm" and "BatchNorm" not in t
                         for m, t in zip(members, types, strict=True))
        if "embedding" in tags or (layer_norm and convs <= 1):
            return "width"
        if convs or any("BatchNorm" in t for t in types):
            return "channels"
        if "expert_features" in tags or any(m.role in ("out", "in") for m in members):
            return "neurons"
        return "other"

    # ---- public API
    def groups(self, prunable: bool | None = None, kind: str | Sequence[str] | None = None
               ) -> list[Group]:
        """All groups (``prunable=True``: only those that may be cut; ``kind``: one kind or a
        list of kinds), in model order."""
        kinds = None if kind is None else ({kind} if isinstance(kind, str) else set(kind))
        return [g for g in self._groups if (prunable is None or g.prunable == prunable)
                and (kinds is None or g.kind in kinds)]

    def group(self, key: int | str) -> Group:
        """A group by id or by name."""
        for g in self._groups:
            if g.id == key or g.name == key:
                return g
        raise LeanError(f"no group {key!r}; names: "
                        f"{', '.join(g.name for g in self._groups[:8])}...")

    def groups_of(self, tensor: str) -> list[Group]:
        """Groups that cut the tensor ``tensor`` (a state-dict name)."""
        return [g for g in self._groups if any(tensor == t.tensor or tensor in t.aliases
                                               for t in g.tensors)]

    def groups_in(self, path: str) -> list[Group]:
        """Groups that reach into the module at ``path`` ("" is the whole model): a tensor of it
        or of a submodule, or a value computed in its forward, lies in their dimension. These
        are what a size hard-coded in that forward could disagree with once cut."""
        def inside(module: str) -> bool:
            return not path or module == path or module.startswith(path + ".")
        roots: set[int] = set()
        for module, terms in self._scopes.items():
            if inside(module):
                for term in terms:
                    roots.update(self._dims.atoms(term))
        return [g for g in self._groups if g.root in roots or
                any(inside(t.module) for t in g.tensors)]

    def sublayers(self) -> list[Sublayer]:
        """Residual branches that one module computes entirely (see :class:`Sublayer`)."""
        return list(self._sublayers)

    def keep_indices(self, tensor: str, dim: int, removed: dict[int, Iterable[int]]
                     ) -> torch.Tensor:
        """Indices of ``tensor``'s dimension ``dim`` kept when the units ``removed[group id]``
        are cut from every group."""
        return self._keep(self._member(tensor, dim).term, removed)

    def _keep(self, term: Term, removed: dict[int, Iterable[int]]) -> torch.Tensor:
        term = self._dims.resolve(term)
        keep = torch.ones(self._dims.size(term), dtype=torch.bool)
        roots = set(self._dims.atoms(term))
        for group_id, units in removed.items():
            group = self._groups[group_id]
            if group.root not in roots:
                continue
            units = torch.as_tensor(sorted(set(int(u) for u in units)), dtype=torch.long)
            if units.numel() == 0:
                continue
            unit_of = self._dims.unit_map(term, group.root)
            keep &= ~torch.isin(unit_of, units)
        return keep.nonzero().flatten()

    def _member(self, tensor: str, dim: int) -> _Member:
        for member in self._members:
            if (member.tensor == tensor or tensor in member.aliases) and member.dim == dim:
                return member
        raise LeanError(f"the graph has no tensor {tensor!r} with dimension {dim}")

    def tensor_names(self) -> list[str]:
        """State-dict names of the tensors the graph follows (one per storage)."""
        return list(dict.fromkeys(m.tensor for m in self._members))

    def shape(self, tensor: str) -> tuple[int, ...]:
        """The shape of the state-dict tensor called ``tensor``."""
        return self._shapes[tensor]

    def _group_of_root(self, root: int) -> Group | None:
        for g in self._groups:
            if g.root == root:
                return g
        return None

    def size_after(self, term: Term, removed: dict[int, Iterable[int]]) -> int:
        """Length of an axis described by ``term`` once ``removed`` units are cut."""
        return int(self._keep(term, removed).numel())

    def size_of(self, term: Term) -> int:
        """Length of the axis ``term`` describes (product of factors,
        sum of concatenated parts)."""
        return self._dims.size(term)

    def term_of(self, tensor: str, dim: int) -> Term:
        """The term describing dimension ``dim`` of ``tensor`` (a state-dict name or an alias of
        it); LeanError when the graph does not follow that dimension."""
        return self._member(tensor, dim).term

    def outer_atom_group(self, term: Term) -> tuple[int | None, int]:
        """(group id or None, size) of the outermost atom of ``term``."""
        roots = self._dims.atoms(term)
        if not roots:
            return None, 1
        g = self._group_of_root(roots[0])
        return (None if g is None else g.id), self._dims.sizes[roots[0]]

    def attention_terms(self) -> list[tuple[str, Term, Term]]:
        """(module, query-head axis, key-head axis) of every attention op."""
        out = []
        for site in self._attention:
            # under grouped KV heads the key may arrive repeated (expand + reshape): its head
            # axis is kv_heads x repeats, and only the first part are KV heads
            kv = [r for r in self._dims.atoms(site["kv_heads"])
                  if "broadcast" not in self._dims.tags.get(r, set())]
            out.append((site["module"], site["heads"],
                        product(Atom(r) for r in kv)))
        return out

    def norm_terms(self) -> list[tuple[str, list[Term]]]:
        """(module, normalised axes) of every layer/RMS norm op."""
        return list(self._norms)

    def describe(self, prunable: bool | None = None) -> str:
        """One line per group (``prunable``: True only the prunable ones, False only the blocked
        ones, None all), joined by newlines."""
        return "\n".join(str(g) for g in self.groups(prunable))

    def __str__(self) -> str:
        counts: dict[str, int] = {}
        for g in self.groups(prunable=True):
            counts[g.kind] = counts.get(g.kind, 0) + 1
        text = ", ".join(f"{n} {k}" for k, n in counts.items()) or "none"
        return (f"DependencyGraph: {len(self._groups)} groups, prunable: {text}; "
                f"{len(self._sublayers)} removable sublayers")

    def __repr__(self) -> str:
        return str(self)


def _common_prefix(paths: Sequence[str]) -> str:
    if not paths:
        return ""
    parts = [p.split(".") for p in paths]
    prefix = []
    for items in zip(*parts, strict=False):
        if all(i == items[0] for i in items):
            prefix.append(items[0])
        else:
            break
    return ".".join(prefix)


def _disambiguate_names(groups: list[Group]) -> None:
    seen: dict[str, int] = {}
    for g in groups:
        seen[g.name] = seen.get(g.name, 0) + 1
    counters: dict[str, int] = {}
    for g in groups:
        if seen[g.name] > 1:
            counters[g.name] = counters.get(g.name, 0) + 1
            g.name = f"{g.name} #{counters[g.name]}"
