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
"""

from __future__ import annotations

import inspect
import itertools
import operator
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from leantorch.errors import LeanError, LeanTypeError, describe

__all__ = [
    "DependencyGraph",
    "Group",
    "Sublayer",
    "TensorSlice",
    "build_graph",
]

# --------------------------------------------------------------------------- terms
# A term describes one tensor axis: ("a", atom) | ("p", (factors...)) | ("s", (parts...)).
Term = tuple
ONE: Term = ("p", ())  # an axis of size 1: nothing to cut
_MAX_REASONS = 4


class _Dims:
    """Atoms (index spaces) with union-find, refinement of atoms into products or sums, and the
    reasons an atom may not be cut."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.sizes: list[int] = []
        self.refined: dict[int, Term] = {}
        self.blocked: dict[int, list[str]] = {}
        self.inexact: dict[int, list[str]] = {}
        self.tags: dict[int, set[str]] = {}

    # ---- atoms
    def new(self, size: int, blocked: str | None = None) -> Term:
        if size == 1:
            return ONE
        if size < 1:
            raise LeanError(f"dependency graph: axis of size {size}")
        atom = len(self.parent)
        self.parent.append(atom)
        self.sizes.append(int(size))
        if blocked:
            self.blocked[atom] = [blocked]
        return ("a", atom)

    def find(self, atom: int) -> int:
        parent = self.parent
        while parent[atom] != atom:
            parent[atom] = parent[parent[atom]]
            atom = parent[atom]
        return atom

    def resolve(self, term: Term) -> Term:
        kind = term[0]
        if kind == "a":
            root = self.find(term[1])
            if root in self.refined:
                return self.resolve(self.refined[root])
            return ("a", root)
        return _normalize(kind, tuple(self.resolve(t) for t in term[1]))

    def size(self, term: Term) -> int:
        kind = term[0]
        if kind == "a":
            return self.sizes[term[1]]
        if kind == "p":
            out = 1
            for t in term[1]:
                out *= self.size(t)
            return out
        return sum(self.size(t) for t in term[1])

    def atoms(self, term: Term) -> list[int]:
        """Root atoms of a term, in order (a root may repeat)."""
        term = self.resolve(term)
        if term[0] == "a":
            return [term[1]]
        return [a for t in term[1] for a in self.atoms(t)]

    # ---- facts
    def block(self, term: Term, reason: str) -> None:
        for root in self.atoms(term):
            reasons = self.blocked.setdefault(root, [])
            if reason not in reasons and len(reasons) < _MAX_REASONS:
                reasons.append(reason)

    def mark_inexact(self, term: Term, reason: str) -> None:
        for root in self.atoms(term):
            reasons = self.inexact.setdefault(root, [])
            if reason not in reasons and len(reasons) < _MAX_REASONS:
                reasons.append(reason)

    def tag(self, term: Term, label: str) -> None:
        for root in self.atoms(term):
            self.tags.setdefault(root, set()).add(label)

    def _merge_facts(self, source: int, target: int) -> None:
        for table in (self.blocked, self.inexact):
            if source in table:
                reasons = table.setdefault(target, [])
                for r in table.pop(source):
                    if r not in reasons and len(reasons) < _MAX_REASONS:
                        reasons.append(r)
        if source in self.tags:
            self.tags.setdefault(target, set()).update(self.tags.pop(source))

    def _union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if ra > rb:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self._merge_facts(rb, ra)

    def _alias(self, atom: int, term: Term, why: str) -> None:
        """Refine ``atom`` (unrefined root) into the compound ``term`` everywhere."""
        root = self.find(atom)
        if root in self.atoms(term):
            self.block(("a", root), f"{why}: an axis is reshaped into itself")
            return
        self.refined[root] = term
        for table in (self.blocked, self.inexact):
            for reason in table.pop(root, []):
                (self.block if table is self.blocked else self.mark_inexact)(term, reason)
        for label in self.tags.pop(root, set()):
            self.tag(term, label)

    def split_product(self, atom: int, outer: int) -> tuple[Term, Term]:
        """Refine ``atom`` (an unrefined root) into ``outer x (size // outer)``."""
        first, second = self.new(outer), self.new(self.sizes[atom] // outer)
        self._alias(atom, _normalize("p", (first, second)), "reshape")
        return first, second

    def split_sum(self, atom: int, first_size: int) -> tuple[Term, Term]:
        first, second = self.new(first_size), self.new(self.sizes[atom] - first_size)
        self._alias(atom, _normalize("s", (first, second)), "split")
        return first, second

    # ---- unification
    def unify(self, left: Term, right: Term, why: str) -> None:
        a, b = self.resolve(left), self.resolve(right)
        if a == b:
            return
        size_a, size_b = self.size(a), self.size(b)
        if size_a != size_b:
            self.block(a, f"{why}: sizes {size_a} and {size_b} disagree")
            self.block(b, f"{why}: sizes {size_a} and {size_b} disagree")
            return
        if size_a == 1:
            return
        if a[0] == "a" and b[0] == "a":
            self._union(a[1], b[1])
        elif a[0] == "a":
            self._alias(a[1], b, why)
        elif b[0] == "a":
            self._alias(b[1], a, why)
        elif a[0] == "s" and b[0] == "s":
            self._walk(list(a[1]), list(b[1]), why, additive=True)
        else:
            self._walk(_factors(a), _factors(b), why, additive=False)

    def _walk(self, left: list[Term], right: list[Term], why: str, additive: bool) -> None:
        """Align two factor lists (products) or part lists (sums) on their common refinement."""
        i = j = 0
        while i < len(left) and j < len(right):
            x, y = self.resolve(left[i]), self.resolve(right[j])
            sx, sy = self.size(x), self.size(y)
            if sx == sy:
                self.unify(x, y, why)
                i, j = i + 1, j + 1
                continue
            _small, big, big_list, big_index = (x, y, right, j) if sx < sy else (y, x, left, i)
            s_small, s_big = min(sx, sy), max(sx, sy)
            fits = (s_big - s_small > 0) if additive else (s_big % s_small == 0)
            if big[0] != "a" or not fits:
                self._fail(left, right, why)
                return
            if additive:
                pieces = self.split_sum(big[1], s_small)
            else:
                pieces = self.split_product(big[1], s_small)
            big_list[big_index:big_index + 1] = list(pieces)
        if i != len(left) or j != len(right):
            self._fail(left, right, why)

    def _fail(self, left: list[Term], right: list[Term], why: str) -> None:
        reason = f"{why}: the dimensions are mixed (not a reshape of whole index spaces)"
        for term in (*left, *right):
            self.block(term, reason)


def _normalize(kind: str, parts: tuple[Term, ...]) -> Term:
    """A ``kind`` term ("p" or "s") over ``parts``, nested terms of the same kind flattened;
    a single part is itself."""
    flat: list[Term] = []
    for p in parts:
        if p[0] == kind:
            flat.extend(p[1])
        else:
            flat.append(p)
    return flat[0] if len(flat) == 1 else (kind, tuple(flat))


def _factors(term: Term) -> list[Term]:
    return list(term[1]) if term[0] == "p" else [term]


# --------------------------------------------------------------------------- public objects
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


@dataclass
class Sublayer:
    """A residual branch ``x + f(x)`` whose module ``path`` computes ``f`` entirely (pre-norm
    blocks: attention or MLP), so replacing it by zeros removes the sublayer. ``norm`` is the
    module whose output only feeds the branch (becomes dead when the branch goes)."""

    path: str
    kind: str  # "attention" | "mlp" | "block" (a convolutional residual block)
    norm: str | None
    add_scope: str


# --------------------------------------------------------------------------- tracing
_LEAF_OUTPUTS: dict[int, list[tuple[tuple[int, ...], torch.dtype]]] = {}


@torch.library.custom_op("leantorch::graph_leaf", mutates_args=())
def _graph_leaf(inputs: list[torch.Tensor], key: int) -> list[torch.Tensor]:
    """Stand-in for a leaf module during tracing (never run for real)."""
    raise LeanError("leantorch::graph_leaf only exists while a dependency graph is traced")


@_graph_leaf.register_fake
def _graph_leaf_fake(inputs: list[torch.Tensor], key: int) -> list[torch.Tensor]:
    device = inputs[0].device if inputs else torch.device("cpu")
    return [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in _LEAF_OUTPUTS[key]]


class _LeafStandIn(nn.Module):
    """Replaces a leaf module while tracing: one opaque op with the recorded output shapes."""

    def __init__(self, key: int, spec: Any, path: str) -> None:
        super().__init__()
        self.key, self.spec, self.path = key, spec, path

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outputs = torch.ops.leantorch.graph_leaf(tensors, self.key)
        return tree_unflatten(list(outputs), self.spec)


def _as_call(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, list):
        return tuple(example_inputs), {}
    if isinstance(example_inputs, tuple):
        if len(example_inputs) == 2 and isinstance(example_inputs[0], tuple) and \
                isinstance(example_inputs[1], dict):
            return example_inputs[0], dict(example_inputs[1])  # (args, kwargs)
        return example_inputs, {}
    return (example_inputs,), {}


def _module_path_stack(model: nn.Module) -> tuple[list[str], list[Any]]:
    """Hooks that keep the stack of modules being run (the innermost one left on the stack
    when a forward raises tells which module could not be traced)."""
    stack: list[str] = []
    handles = []
    for path, module in model.named_modules():
        def pre(_m: nn.Module, _args: Any, path: str = path) -> None:
            stack.append(path)

        def post(_m: nn.Module, _args: Any, _out: Any, path: str = path) -> None:
            if stack and stack[-1] == path:
                stack.pop()
        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    return stack, handles


def _leaf_outputs(model: nn.Module, leaves: dict[str, nn.Module], args: tuple[Any, ...],
                  kwargs: dict[str, Any]) -> dict[str, Any]:
    """Each leaf's output on one real forward (the stand-ins reproduce their shapes)."""
    recorded: dict[str, Any] = {}
    handles = []
    for path, module in leaves.items():
        def hook(_m: nn.Module, _a: Any, out: Any, path: str = path) -> None:
            recorded.setdefault(path, out)
        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    for path, out in ((p, recorded.get(p)) for p in leaves):
        if out is None:
            raise LeanError(f"leaf_modules: {path!r} did not run on the example inputs")
        if not all(isinstance(t, torch.Tensor) for t in tree_flatten(out)[0]):
            raise LeanError(f"leaf_modules: {path!r} returns something other than tensors "
                            f"({type(out).__name__}); only modules returning tensors (or "
                            "tuples/lists of them) can be leaves")
    return recorded


def _export(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
            leaf_modules: Sequence[str], training: bool = False) -> Any:
    """torch.export the model in eval mode (``training``: in training mode), leaf modules
    swapped for opaque stand-ins, all restored afterwards. The leaves' output shapes are
    recorded on one eval-mode forward in both modes (a training-mode forward would update
    BatchNorm statistics)."""
    from leantorch.compress.change import get_module, replace_module

    leaves = {}
    for path in leaf_modules:
        if not path:
            raise LeanError("leaf_modules: '' is the whole model; name a submodule")
        try:
            leaves[path] = get_module(model, path)
        except LeanError as error:
            raise LeanError(f"leaf_modules: no module at path {path!r} in "
                            f"{type(model).__name__}") from error
    was_training = model.training
    model.eval()
    swapped: list[str] = []
    handles: list[Any] = []
    try:
        recorded = _leaf_outputs(model, leaves, args, kwargs) if leaves else {}
        for path, module in leaves.items():
            flat, spec = tree_flatten(recorded[path])
            _LEAF_OUTPUTS[id(module)] = [(tuple(t.shape), t.dtype) for t in flat]
            replace_module(model, path, _LeafStandIn(id(module), spec, path))
            swapped.append(path)
        stack, handles = _module_path_stack(model)
        model.train(training)
        try:
            # fake tensors run the forward, so buffers keep their values; the RNG is forked
            # anyway so that tracing dropout never shifts the caller's random stream
            with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
                # nn.LSTM re-caches its weights in forward; export warns about that list
                warnings.filterwarnings("ignore", message=r"The tensor attributes .*_flat_weights")
                return torch.export.export(model, args, kwargs, strict=False)
        except Exception as error:
            raise _untraceable(model, stack, error) from error
    finally:
        for handle in handles:
            handle.remove()
        for path in reversed(swapped):
            replace_module(model, path, leaves[path])
        for module in leaves.values():
            _LEAF_OUTPUTS.pop(id(module), None)
        model.train(was_training)


def _untraceable(model: nn.Module, stack: list[str], error: Exception) -> LeanError:
    first = " ".join(str(error).split())[:300]
    if stack:
        path = stack[-1]
        kind = type(model.get_submodule(path)).__name__ if path else type(model).__name__
        where = f"the module at {path!r} ({kind})" if path else f"the model's own forward ({kind})"
        hint = (f"mark it as a leaf: build_graph(model, inputs, leaf_modules=[{path!r}]) (its "
                "tensors are then never cut), or make its forward traceable by torch.export "
                "(no data-dependent Python control flow, no .item() / .tolist() / numpy)")
        if not path:
            hint = ("make the forward traceable by torch.export (no data-dependent Python control "
                    "flow, no .item() / .tolist() / numpy), or mark the failing submodule as a leaf")
        return LeanError(f"build_graph: torch.export could not trace {where}: "
                         f"{type(error).__name__}: {first}; {hint}")
    return LeanError(f"build_graph: torch.export could not trace the model: "
                     f"{type(error).__name__}: {first}")


# --------------------------------------------------------------------------- propagation
def _shape_of(value: Any) -> tuple[int, ...] | None:
    if isinstance(value, torch.Tensor):
        return tuple(int(s) for s in value.shape)
    return None


def _bind(node: torch.fx.Node) -> dict[str, Any]:
    """The node's arguments by schema name (defaults filled in)."""
    schema = node.target._schema
    bound: dict[str, Any] = {}
    positional = list(node.args)
    for index, argument in enumerate(schema.arguments):
        if index < len(positional) and not argument.kwarg_only:
            bound[argument.name] = positional[index]
        elif argument.name in node.kwargs:
            bound[argument.name] = node.kwargs[argument.name]
        elif argument.has_default_value():
            bound[argument.name] = argument.default_value
        else:
            bound[argument.name] = None
    return bound


def _module_of(node: torch.fx.Node) -> tuple[str, str]:
    """(path, class name) of the innermost module running ``node``."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, cls = list(stack.values())[-1]
    name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
    return _clean_path(path), name.rsplit(".", 1)[-1]


def _clean_path(path: str) -> str:
    # non-strict export records plain dotted paths; strict mode writes L['self'].a.b
    path = re.sub(r"^L\['self'\]\.?", "", path)
    return re.sub(r"\[(\d+)\]", r".\1", path).strip(".")


def _stack_paths(node: torch.fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return [_clean_path(p) for p, _ in stack.values()]


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
_IGNORED = {"aten._assert_tensor_metadata", "aten._assert_scalar", "aten.sym_constrain_range",
            "aten.sym_constrain_range_for_size", "aten._assert_async", "aten.sym_size",
            "aten.sym_numel", "aten.sym_stride", "aten._local_scalar_dense",
            "aten.sym_storage_offset"}
_VIEWS = {"aten.view", "aten.reshape", "aten._unsafe_view", "aten.flatten", "aten.unflatten",
          "aten.view_as", "aten.reshape_as"}
_SUM_LIKE = {"aten.sum", "aten.linalg_vector_norm", "aten.norm", "aten.nansum", "aten.any",
             "aten.all"}
_MEAN_LIKE = {"aten.mean", "aten.amax", "aten.amin", "aten.max", "aten.min", "aten.var",
              "aten.std", "aten.var_mean", "aten.std_mean", "aten.logsumexp", "aten.prod",
              "aten.nanmean"}
_FACTORIES = {"aten.arange", "aten.zeros", "aten.ones", "aten.full", "aten.empty",
              "aten.new_ones", "aten.new_zeros", "aten.new_full", "aten.new_empty", "aten.rand",
              "aten.randn", "aten.randint", "aten.scalar_tensor", "aten.eye", "aten.linspace",
              "aten.tensor", "aten.empty_strided", "aten.new_empty_strided"}


class _Propagator:
    """Walks an exported graph and states, op by op, which dimensions are the same."""

    def __init__(self, program: Any, model: nn.Module) -> None:
        self.program = program
        self.model = model
        self.dims = _Dims()
        self.param_terms: dict[str, list[Term]] = {}
        self.attention: list[dict[str, Any]] = []  # sdpa / act x act matmul sites
        self.adds: list[torch.fx.Node] = []
        self.values: dict[torch.fx.Node, Any] = {}
        self.scopes: dict[str, list[Term]] = {}  # module path -> terms produced in it
        self.norms: list[tuple[str, list[Term]]] = []  # (module, normalised dims) of norms
        self.weight_nodes: set[torch.fx.Node] = set()  # placeholders holding a param / buffer
        self.used: set[str] = set()  # params / buffers some traced op reads

    # ---- helpers
    def value(self, arg: Any) -> Any:
        if isinstance(arg, torch.fx.Node):
            return self.values.get(arg)
        if isinstance(arg, list | tuple):
            return type(arg)(self.value(a) for a in arg)
        return None

    def fresh(self, shape: Sequence[int], blocked: str | None = None) -> list[Term]:
        return [self.dims.new(s, blocked) for s in shape]

    def fresh_like(self, val: Any, blocked: str | None = None) -> Any:
        if isinstance(val, torch.Tensor):
            return self.fresh(_shape_of(val), blocked)
        if isinstance(val, list | tuple):
            return [self.fresh_like(v, blocked) for v in val]
        return None

    def block_value(self, value: Any, reason: str) -> None:
        if value is None:
            return
        if isinstance(value, list) and value and isinstance(value[0], tuple):
            for term in value:
                self.dims.block(term, reason)
            return
        if isinstance(value, list | tuple):
            for v in value:
                self.block_value(v, reason)

    def unify(self, a: Term, b: Term, why: str) -> None:
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
                    terms = self.fresh(_shape_of(val))
                    if target in self.param_terms:  # seen by an earlier trace: same tensor
                        for a, b in zip(self.param_terms[target], terms, strict=True):
                            self.unify(a, b, f"{target} in both traced modes")
                    else:
                        self.param_terms[target] = terms
                    self.values[node] = terms
                    self.weight_nodes.add(node)
                    if any(not (u.op == "call_function" and _op_name(u.target) in _IGNORED)
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
                module, _ = _module_of(node)
                out = self.values[node]
                if isinstance(out, list) and out and isinstance(out[0], tuple):
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
        target = node.target
        if target is operator.getitem:
            source = self.value(node.args[0])
            if isinstance(source, list | tuple) and not (source and isinstance(source[0], tuple)):
                return source[node.args[1]]
            return self.fresh_like(val, "indexing a value the graph does not follow")
        name = _op_name(target)
        module, _cls = _module_of(node)
        where = f"{name} in {module or '(model)'}"
        if name in _IGNORED:
            return None
        rule = _RULES.get(name)
        if rule is not None:
            try:
                return rule(self, node, val, where)
            except _Unsupported as why:
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
        source = self.value(node.args[0])
        shape = _shape_of(val)
        if source is None or shape is None or len(source) != len(shape):
            return self.fresh_like(val)
        return list(source)

    def broadcast(self, node: torch.fx.Node, val: Any, where: str) -> list[Term] | None:
        shape = _shape_of(val)
        if shape is None:
            return self.fresh_like(val)
        operands = [self.value(a) for a in node.args if isinstance(a, torch.fx.Node)]
        operands += [self.value(a) for a in node.kwargs.values() if isinstance(a, torch.fx.Node)]
        return self.broadcast_terms([o for o in operands if o is not None], shape, where)

    def broadcast_terms(self, operands: list[list[Term]], shape: Sequence[int],
                        where: str) -> list[Term]:
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


class _Unsupported(Exception):
    pass


def _op_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        text = str(target)  # aten.linear.default
        return text.rsplit(".", 1)[0]
    if isinstance(target, torch._ops.OpOverloadPacket):
        return str(target)
    return getattr(target, "__name__", str(target))


# --------------------------------------------------------------------------- op rules
_RULES: dict[str, Any] = {}


def _rule(*names: str) -> Any:
    def register(fn: Any) -> Any:
        for n in names:
            _RULES[n] = fn
        return fn
    return register


def _terms(p: _Propagator, arg: Any) -> list[Term]:
    value = p.value(arg)
    if not (isinstance(value, list) and all(isinstance(t, tuple) for t in value)):
        raise _Unsupported("an input the graph does not follow")
    return list(value)


def _dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


@_rule("aten.linear")
def _linear(p: _Propagator, node: torch.fx.Node, val: Any, where: str) -> list[Term]:
    args = _bind(node)
    x, w = _terms(p, args["input"]), _terms(p, args["weight"])
    if len(w) == 1:  # a vector weight: dot product
        p.unify(x[-1], w[0], where)
        return x[:-1]
    p.unify(x[-1], w[1], where)
    out = [*x[:-1], w[0]]
    if args.get("bias") is not None:
        p.unify(_terms(p, args["bias"])[0], w[0], where)
    return out


def _matmul_terms(p: _Propagator, node: torch.fx.Node, a: list[Term], b: list[Term],
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
            _tag_heads(p, batch[-1])
        module, _ = _module_of(node)
        p.attention.append({"module": module, "heads": batch[-1] if batch else ONE,
                            "kv_heads": batch[-1] if batch else ONE})
    out = batch + ([] if squeeze_first else [a[-2]]) + ([] if squeeze_last else [b[-1]])
    return out


def _tag_heads(p: _Propagator, term: Term) -> None:
    """Tag the atoms of a head axis: under grouped KV heads, the key's head axis is
    ``kv_heads x repeats`` (the repeats born of an expand): repeats are query heads within a
    group, the rest are KV heads."""
    roots = p.dims.atoms(term)
    repeats = [r for r in roots if "broadcast" in p.dims.tags.get(r, set())]
    for r in roots:
        p.dims.tag(("a", r), "heads" if (r in repeats or not repeats) else "kv_heads")


def _is_weight(p: _Propagator, node: Any, depth: int = 6) -> bool:
    """Whether ``node`` is a parameter or buffer (possibly viewed or transposed)."""
    for _ in range(depth):
        if not isinstance(node, torch.fx.Node):
            return False
        if node.op == "placeholder":
            return node in p.weight_nodes
        if node.op != "call_function" or not node.args:
            return False
        name = _op_name(node.target)
        if name not in ("aten.t", "aten.transpose", "aten.permute", "aten.view", "aten.reshape",
                        "aten.expand", "aten.alias", "aten.to", "aten._to_copy",
                        "aten.contiguous", "aten.unsqueeze", "aten.select", "aten.clone"):
            return False
        node = node.args[0]
    return False


@_rule("aten.matmul", "aten.mm", "aten.bmm")
def _matmul(p: _Propagator, node: torch.fx.Node, val: Any, where: str) -> list[Term]:
    a, b = _terms(p, node.args[0]), _terms(p, node.args[1])
    return _matmul_terms(p, node, a, b, _shape_of(val), where,
                         _is_weight(p, node.args[1]), _is_weight(p, node.args[0]))


@_rule("aten.addmm", "aten.baddbmm", "aten.addbmm")
def _addmm(p: _Propagator, node: torch.fx.Node, val: Any, where: str) -> list[Term]:
    a, b = _terms(p, node.args[1]), _terms(p, node.args[2])
    out = _matmul_terms(p, node, a, b, _shape_of(val), where,
                        _is_weight(p, node.args[2]), _is_weight(p, node.args[1]))
    bias = _terms(p, node.args[0])
    return p.broadcast_terms([out, bias], _shape_of(val), where)


@_rule("aten.einsum")
def _einsum(p: _Propagator, node: torch.fx.Node, val: Any, where: str) -> list[Term]:
    equation = node.args[0].replace(" ", "")
    operands = [_terms(p, a) for a in node.args[1]]
    if "..." in equation or "->" not in equation:
        raise _Unsupported(f"einsum {equation!r}")
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
    for letter, size in zip(output, _shape_of(val), strict=True):
        out.append(letters.get(letter, ONE) if size > 1 else ONE)
    return out


def _conv_common(p: _Propagator, x: list[Term], w: list[Term], bias: Any, groups: int,
                 transposed: bool, val: Any, where: str) -> list[Term]:
    shape = _shape_of(val)
    in_channels = p.dims.size(x[1])
    for term in w[2:]:
        p.dims.block(term, f"{where}: kernel window")
        p.dims.tag(term, "kernel")
    if transposed:
        # weight (in, out / groups, *k)
        if groups != 1:
            raise _Unsupported("grouped transposed convolution")
        p.unify(x[1], w[0], where)
        out_channels = w[1]
    else:
        # weight (out, in / groups, *k); channel c of group g is g * (in / groups) + c
        if groups == 1:
            p.unify(x[1], w[1], where)
            out_channels = w[0]
        else:
            per_group_in = in_channels // groups
            out_total = p.dims.size(w[0])
            x_term = p.dims.resolve(x[1])
            w_term = p.dims.resolve(w[0])
            g_in = _split_outer(p, x_term, groups, where)
            g_out = _split_outer(p, w_term, groups, where)
            p.unify(g_in[0], g_out[0], where)
            p.dims.tag(g_in[0], "conv_groups")
            if per_group_in > 1:
                p.unify(g_in[1], w[1], where)
            del out_total
            out_channels = w[0]
    if bias is not None:
        p.unify(_terms(p, bias)[0], out_channels, where)
    spatial = [p.dims.new(s, f"{where}: spatial size") for s in shape[2:]]
    return [x[0], out_channels, *spatial]


def _split_outer(p: _Propagator, term: Term, outer: int, where: str) -> tuple[Term, Term]:
    """View ``term`` as ``outer x rest`` (refining atoms as needed)."""
    size = p.dims.size(term)
    first, second = p.dims.new(outer), p.dims.new(size // outer)
    p.unify(term, _normalize("p", (first, second)), where)
    return p.dims.resolve(first), p.dims.resolve(second)


@_rule("aten.conv1d", "aten.conv2d", "aten.conv3d")
def _conv(p: _Propagator, node: torch.fx.Node, val: Any, where: str) -> list[Term]:
    args = _bind(node)
    x, w = _terms(p, args["input"]), _terms(p, args["weight"])
    if len(x) != len(w):  # unbatched input
        raise _Unsupported("unbatched convolution input")
    return _conv_common(p, x, w, args.get("bias"), int(args.get("groups") or 1), False, val,
                        where)


@_rule("aten.convolution", "aten._convolution")
def _convolution(p: _Propagator, node: torch.fx.Node, val: Any, where: str) -> list[Term]:
    args = _bind(node)
    x, w = _terms(p, args["input"]), _terms(p, args["weight"])
    return _conv_common(p, x, w, args.get("bias"), int(args["groups"]), bool(args["transposed"]),
                        val, where)


@_rule("aten.conv_transpose1d", "aten.conv_transpose2d", "aten.conv_transpose3d")
def _conv_transpose(p: _Propagator, node: torch.fx.Node, val: Any, where: str) -> list[Term]:
    args = _bind(node)
    x, w = _terms(p, args["input"]), _terms(p, args["weight"])
    return _conv_common(p, x, w, args.get("bias"), int(args.get("groups") or 1), True, val, where)


@_rule("aten.batch_norm", "aten._native_batch_norm_legit_no_training",
       "aten._native_batch_norm_legit", "aten.native_batch_norm",
       "aten._native_batch_norm_legit_functional", "aten.instance_norm")
def _batch_norm(p: _Propagator, node: torch.fx.Node, val: Any, where: str) -> Any:
    args = _bind(node)
    x = _terms(p, args["input"])
    for name in ("weight", "bias", "running_mean", "running_var"):
        if args.get(name) is not None:
            p.unify(_terms(p, args[name])[0], x[1], where)
    if _op_name(node.target) == "aten.instance_norm":
        p.dims.mark_inexact(x[1], f"{where}: instance statistics")
    if isinstance(val, tuple | list):
        return [list(x)] + [p.fresh_like(v) for v in val[1:]]
    return list(x)


@_rule("aten.layer_norm", "aten.native_layer_norm", "aten.rms_norm")
def _layer_norm(p: _Propagator, node: torch.fx.Node, val: Any, where: str) -> Any:
    args = _bind(node)
    x = _terms(p, args["input"])
    count = len(args["normalized_shape"])
    normalized = x[len(x) - count:]
    for name in ("weight", "bias"):
        if args.get(name) is not None:
            for a, b in zip(_terms(p, args[name]), normalized, strict=True):
                p.unify(a, b, where)
    for term in normalized:
        p.dims.mark_inexact(term, f"{where}: normalised over this dimension")
        p.dims.tag(term, "layer_norm")
    p.norms.append((_module_of(node)[0], list(normalized)))
    if isinstance(val, tuple | list):
        return [list(x)] + [p.fresh_like(v) for v in val[1:]]
    return list(x)


@_rule("aten.group_norm", "aten.native_group_norm")
def _group_norm(p: _Propagator, node: torch.fx.Node, val: Any, where: str) -> Any:
    args = _bind(node)
    x = _terms(p, args["input"])
    groups = int(args.get("num_groups") or args.get("group") or 1)
    for name in ("weight", "bias"):
        if args.get(name) is not None:
            p.unify(_terms(p, args[name])[0], x[1], where)
    if groups > 1:
        p.dims.block(x[1], f"{where}: GroupNorm with {groups} groups fixes the channel count "
                     "per group")
    p.dims.mark_inexact(x[1], f"{where}: normalised over this dimension")
    if isinstance(val, tuple | list):
        return [list(x)] + [p.fresh_like(v) for v in val[1:]]
    return list(x)


@_rule("aten.lstm")
def _lstm(p: _Propagator, node: torch.fx.Node, val: Any, where: str) -> list[list[Term]]:
    """``nn.LSTM`` (one op for all layers and directions). Its hidden size ``H`` is one index
    space for every layer and direction (the module has one ``hidden_size``): the rows of
    ``weight_ih`` / ``weight_hh`` and both biases are ``4 gates x H`` (gate-major: input,
    forget, cell, output), the columns of ``weight_hh`` are ``H``, a deeper layer's
    ``weight_ih`` columns are the previous layer's output (``H``, or ``H + H`` when
    bidirectional), and so are the output's features and the last axis of ``h_n`` / ``c_n``.
    The first layer's ``weight_ih`` columns are the input's features. Cutting hidden unit ``u``
    is exact: with zero initial state a unit whose gate rows are zero keeps ``c = h = 0``."""
    if _op_name(node.target) != "aten.lstm" or "batch_first" not in _bind(node):
        raise _Unsupported("packed sequences")
    args = _bind(node)
    x = _terms(p, args["input"])
    hx = [_terms(p, h) for h in args["hx"]]
    params = [_terms(p, w) for w in args["params"]]
    layers, dirs = int(args["num_layers"]), 2 if args["bidirectional"] else 1
    per = 4 if args["has_biases"] else 2
    if len(params) != layers * dirs * per:
        raise _Unsupported("LSTM with proj_size (a projected hidden state)")
    size = p.dims.size(params[1][1])  # weight_hh_l0: (4H, H)
    hidden = p.dims.new(size)
    gates = p.dims.new(4, f"{where}: the four LSTM gates")
    p.dims.tag(gates, "gates")
    rows = _normalize("p", (gates, hidden))
    features = x[-1]
    for layer in range(layers):
        for direction in range(dirs):
            tensors = params[(layer * dirs + direction) * per:][:per]
            p.unify(tensors[0][1], features, where)  # weight_ih columns: this layer's input
            p.unify(tensors[1][1], hidden, where)  # weight_hh columns: the hidden state
            for t in tensors:
                p.unify(t[0], rows, where)
        features = _normalize("s", (hidden,) * dirs)
    for h in hx:
        p.unify(h[-1], hidden, where)
    output = [*x[:-1], features]
    return [output, *(list(h) for h in hx)] if len(hx) == 2 else \
        [output, *p.fresh_like(list(val[1:]))]


@_rule("aten.embedding")
def _embedding(p: _Propagator, node: torch.fx.Node, val: Any, where: str) -> list[Term]:
    w, ids = _terms(p, node.args[0]), _terms(p, node.args[1])
    p.dims.block(w[0], f"{where}: rows indexed by ids")
    p.dims.tag(w[1], "embedding")
    return [*ids, w[1]]


@_rule("aten.scaled_dot_product_attention")
def _sdpa(p: _Propagator, node: torch.fx.Node, val: Any, where: str) -> list[Term]:
    args = _bind(node)
    q, k, v = (_terms(p, args[n]) for n in ("query", "key", "value"))
    p.dims.block(q[-1], f"{where}: per-head size (prune whole heads)")
    p.dims.block(v[-1], f"{where}: per-head size (prune whole heads)")
    p.dims.tag(q[-1], "head_dim")
    p.dims.tag(v[-1], "head_dim")
    p.unify(q[-1], k[-1], where)
    p.unify(k[-2], v[-2], where)
    module, _ = _module_of(node)
    heads_q, heads_k = (q[-3], k[-3]) if len(q) >= 3 else (ONE, ONE)
    if len(q) >= 3:
        p.unify(heads_k, v[-3], where)
        size_q, size_k = p.dims.size(heads_q), p.dims.size(heads_k)
        if size_q != size_k and size_k > 1 and size_q % size_k == 0:
            kv, per_group = _split_outer(p, heads_q, size_k, where)
            p.unify(kv, heads_k, where)
            p.dims.tag(kv, "kv_heads")
            p.dims.tag(per_group, "heads")
        else:
            p.unify(heads_q, heads_k, where)
            _tag_heads(p, heads_k)
        batch = p.broadcast_terms([q[:-3], k[:-3], v[:-3]], _shape_of(val)[:-3], where)
    else:
        batch = []
    if args.get("attn_mask") is not None:
        mask = _terms(p, args["attn_mask"])
        scores_shape = [*list(_shape_of(val)[:-1]), p.dims.size(k[-2])]
        p.broadcast_terms([[*q[:-1], k[-2]], mask], scores_shape, where)
    p.attention.append({"module": module, "heads": heads_q, "kv_heads": heads_k})
    return batch + ([heads_q] if len(q) >= 3 else []) + [q[-2], v[-1]]


@_rule(*_VIEWS)
def _view(p: _Propagator, node: torch.fx.Node, val: Any, where: str) -> list[Term]:
    return _reshape(p, _terms(p, node.args[0]), _shape_of(val), where)


def _reshape(p: _Propagator, terms: list[Term], shape: Sequence[int], where: str) -> list[Term]:
    factors: list[Term] = []
    for term in terms:
        factors.extend(_factors(p.dims.resolve(term)))
    factors = [f for f in factors if p.dims.size(f) > 1]
    out: list[Term] = []
    i = 0
    for size in shape:
        if size == 1:
            out.append(ONE)
            continue
        taken: list[Term] = []
        product = 1
        while product < size:
            if i >= len(factors):
                return _mixed(p, terms, shape, where)
            factor = p.dims.resolve(factors[i])
            f_size = p.dims.size(factor)
            if product * f_size <= size:
                taken.append(factor)
                product *= f_size
                i += 1
                continue
            need = size // product
            if size % product or f_size % need or factor[0] != "a":
                return _mixed(p, terms, shape, where)
            first, second = p.dims.split_product(factor[1], need)
            factors[i:i + 1] = [first, second]
        if product != size:
            return _mixed(p, terms, shape, where)
        out.append(_normalize("p", tuple(taken)))
    if i != len(factors):
        return _mixed(p, terms, shape, where)
    return out


def _mixed(p: _Propagator, terms: list[Term], shape: Sequence[int], where: str) -> list[Term]:
    reason = f"{where}: reshape mixes dimensions"
    for term in terms:
        p.dims.block(term, reason)
    return p.fresh(shape, reason)


@_rule("aten.permute")
def _permute(p: _Propagator, node: torch.fx.Node, val: Any, where: str) -> list[Term]:
    x = _terms(p, node.args[0])
    order = [_dim(d, len(x)) for d in node.args[1]]
    return [x[d] for d in order]


@_rule("aten.transpose", "aten.swapaxes", "aten.swapdims")
def _transpose(p: _Propagator, node: torch.fx.Node, val: Any, where: str) -> list[Term]:
    x = list(_terms(p, node.args[0]))
    a, b = _dim(node.args[1], len(x)), _dim(node.args[2], len(x))
    x[a], x[b] = x[b], x[a]
    return x


@_rule("aten.t", "aten.numpy_T")
def _t(p: _Propagator, node: torch.fx.Node, val: Any, where: str) -> list[Term]:
    return list(reversed(_terms(p, node.args[0])))


@_rule("aten.unsqueeze")
def _unsqueeze(p: _Propagator, node: torch.fx.Node, val: Any, where: str) -> list[Term]:
    x = list(_terms(p, node.args[0]))
    d = node.args[1]
    d = d + len(x) + 1 if d < 0 else d
    return [*x[:d], ONE, *x[d:]]


@_rule("aten.squeeze")
def _squeeze(p: _Propagator, node: torch.fx.Node, val: Any, where: str) -> list[Term]:
    x = _terms(p, node.args[0])
    return _reshape(p, x, _shape_of(val), where)


@_rule("aten.expand", "aten.expand_as", "aten.broadcast_to")
def _expand(p: _Propagator, node: torch.fx.Node, val: Any, where: str) -> list[Term]:
    x = _terms(p, node.args[0])
    shape = _shape_of(val)
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


@_rule("aten.repeat", "aten.tile", "aten.repeat_interleave")
def _repeat(p: _Propagator, node: torch.fx.Node, val: Any, where: str) -> list[Term]:
    x = _terms(p, node.args[0]) if isinstance(node.args[0], torch.fx.Node) else []
    shape = _shape_of(val)
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


@_rule("aten.select")
def _select(p: _Propagator, node: torch.fx.Node, val: Any, where: str) -> list[Term]:
    x = list(_terms(p, node.args[0]))
    d = _dim(node.args[1], len(x))
    p.dims.block(x[d], f"{where}: one index is selected")
    return x[:d] + x[d + 1:]


@_rule("aten.slice")
def _slice(p: _Propagator, node: torch.fx.Node, val: Any, where: str) -> list[Term]:
    x = list(_terms(p, node.args[0]))
    args = _bind(node)
    d = _dim(args["dim"], len(x))
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
    x[d] = _sum_part(p, x[d], start, end, where)
    return x


def _sum_part(p: _Propagator, term: Term, start: int, end: int, where: str) -> Term:
    """The part [start, end) of ``term``, refining it into a sum of parts."""
    size = p.dims.size(term)
    bounds = [0] + [b for b in (start, end) if 0 < b < size] + [size]
    pieces = [p.dims.new(b - a) for a, b in itertools.pairwise(bounds)]
    p.unify(term, _normalize("s", tuple(pieces)), where)
    return p.dims.resolve(pieces[bounds.index(start)])


@_rule("aten.roll")
def _roll(p: _Propagator, node: torch.fx.Node, val: Any, where: str) -> list[Term]:
    """A cyclic shift along some dimensions (Swin's shifted windows roll the spatial axes).
    The other dimensions pass through untouched. Along a rolled dimension index ``i`` moves to
    ``(i + shift) % size``: once units are cut the same shift on the shorter axis moves them
    elsewhere, so a rolled dimension is never cut (and a roll without ``dims``, over the
    flattened tensor, fixes every dimension)."""
    x = list(_terms(p, node.args[0]))
    args = _bind(node)
    dims = args.get("dims") or []
    dims = [dims] if isinstance(dims, int) else list(dims)
    rolled = [_dim(d, len(x)) for d in dims] if dims else list(range(len(x)))
    for d in rolled:
        p.dims.block(x[d], f"{where}: rolled along this dimension (the shift depends on its "
                     "length)")
    return x


@_rule("aten.narrow")
def _narrow(p: _Propagator, node: torch.fx.Node, val: Any, where: str) -> list[Term]:
    x = list(_terms(p, node.args[0]))
    d = _dim(node.args[1], len(x))
    start, length = int(node.args[2]), int(node.args[3])
    x[d] = _sum_part(p, x[d], start, start + length, where)
    return x


@_rule("aten.split", "aten.split_with_sizes", "aten.chunk", "aten.unsafe_split",
       "aten.tensor_split")
def _split(p: _Propagator, node: torch.fx.Node, val: Any, where: str) -> list[list[Term]]:
    x = list(_terms(p, node.args[0]))
    args = _bind(node)
    d = _dim(args.get("dim") or 0, len(x))
    sizes = [_shape_of(v)[d] for v in val]
    pieces = [p.dims.new(s) for s in sizes]
    p.unify(x[d], _normalize("s", tuple(pieces)), where)
    return [[*x[:d], p.dims.resolve(piece), *x[d + 1:]] for piece in pieces]


@_rule("aten.unbind")
def _unbind(p: _Propagator, node: torch.fx.Node, val: Any, where: str) -> list[list[Term]]:
    x = list(_terms(p, node.args[0]))
    d = _dim(node.args[1] if len(node.args) > 1 else 0, len(x))
    p.dims.block(x[d], f"{where}: unbound into separate tensors")
    return [x[:d] + x[d + 1:] for _ in val]


@_rule("aten.cat", "aten.concat", "aten.concatenate")
def _cat(p: _Propagator, node: torch.fx.Node, val: Any, where: str) -> list[Term]:
    tensors = [_terms(p, t) for t in node.args[0]]
    shape = _shape_of(val)
    tensors = [t for t in tensors if not (len(t) == 1 and p.dims.size(t[0]) == 0)]
    d = _dim(node.args[1] if len(node.args) > 1 else 0, len(shape))
    out = list(tensors[0])
    for t in tensors[1:]:
        for i in range(len(shape)):
            if i != d:
                p.unify(out[i], t[i], where)
    out[d] = _normalize("s", tuple(t[d] if p.dims.size(t[d]) > 1 else p.dims.new(1)
                                   for t in tensors))
    if p.dims.size(out[d]) != shape[d]:
        raise _Unsupported("cat sizes")
    return out


@_rule("aten.stack")
def _stack(p: _Propagator, node: torch.fx.Node, val: Any, where: str) -> list[Term]:
    tensors = [_terms(p, t) for t in node.args[0]]
    shape = _shape_of(val)
    d = _dim(node.args[1] if len(node.args) > 1 else 0, len(shape))
    out = list(tensors[0])
    for t in tensors[1:]:
        for i in range(len(out)):
            p.unify(out[i], t[i], where)
    return [*out[:d], p.dims.new(shape[d], f"{where}: stacked"), *out[d:]]


def _reduce(p: _Propagator, node: torch.fx.Node, val: Any, where: str, exact: bool) -> Any:
    x = _terms(p, node.args[0])
    args = _bind(node)
    dims = args.get("dim")
    if dims is None and "dim" not in args:
        dims = None
    if isinstance(dims, int):
        dims = [dims]
    keep = bool(args.get("keepdim") or False)
    reduced = list(range(len(x))) if not dims else [_dim(d, len(x)) for d in dims]
    for d in reduced:
        if exact:
            continue
        p.dims.mark_inexact(x[d], f"{where}: reduced by a statistic that counts every index")
    out = [ONE if i in reduced else t for i, t in enumerate(x)] if keep else \
        [t for i, t in enumerate(x) if i not in reduced]
    if isinstance(val, tuple | list):  # max.dim / var_mean: several outputs of the same shape
        return [list(out) for _ in val]
    if _shape_of(val) is not None and len(out) != len(_shape_of(val)):
        return p.fresh_like(val)
    return out


@_rule(*_SUM_LIKE)
def _sum(p: _Propagator, node: torch.fx.Node, val: Any, where: str) -> Any:
    return _reduce(p, node, val, where, exact=True)


@_rule(*_MEAN_LIKE)
def _mean(p: _Propagator, node: torch.fx.Node, val: Any, where: str) -> Any:
    return _reduce(p, node, val, where, exact=False)


@_rule("aten.argmax", "aten.argmin")
def _argmax(p: _Propagator, node: torch.fx.Node, val: Any, where: str) -> Any:
    x = _terms(p, node.args[0])
    args = _bind(node)
    if args.get("dim") is None:
        p.block_value(x, f"{where}: positions are returned")
        return p.fresh_like(val)
    d = _dim(args["dim"], len(x))
    p.dims.block(x[d], f"{where}: positions along this dimension are returned")
    out = [ONE if i == d else t for i, t in enumerate(x)] if args.get("keepdim") else \
        [t for i, t in enumerate(x) if i != d]
    return out


@_rule("aten.softmax", "aten._softmax", "aten.log_softmax", "aten._log_softmax",
       "aten.cumsum", "aten.cumprod", "aten.sort", "aten.topk", "aten.kthvalue")
def _along(p: _Propagator, node: torch.fx.Node, val: Any, where: str) -> Any:
    x = _terms(p, node.args[0])
    name = _op_name(node.target)
    args = _bind(node)
    d = _dim(args.get("dim", -1) if args.get("dim") is not None else -1, len(x))
    if name in ("aten.cumsum", "aten.cumprod"):
        p.dims.mark_inexact(x[d], f"{where}: a running sum over this dimension")
    else:
        p.dims.mark_inexact(x[d], f"{where}: every index along this dimension is compared")
    if name in ("aten.topk", "aten.kthvalue"):
        out = list(x)
        out[d] = p.dims.new(_shape_of(val[0])[d], f"{where}: top-k positions")
        return [out, list(out)]
    if isinstance(val, tuple | list):
        return [list(x) for _ in val]
    return list(x)


def _pool(p: _Propagator, node: torch.fx.Node, val: Any, where: str) -> Any:
    x = _terms(p, node.args[0])
    shapes = [_shape_of(v) for v in val] if isinstance(val, tuple | list) else [_shape_of(val)]
    lead = len(x) - _pool_rank(node)
    outs = []
    for shape in shapes:
        out = list(x[:lead]) + [p.dims.new(s, f"{where}: spatial size") for s in shape[lead:]]
        outs.append(out)
    return outs if isinstance(val, tuple | list) else outs[0]


def _pool_rank(node: torch.fx.Node) -> int:
    name = _op_name(node.target)
    for digit in "123":
        if digit + "d" in name:
            return int(digit)
    return 2


for _name in ("aten.max_pool1d", "aten.max_pool2d", "aten.max_pool3d",
              "aten.max_pool2d_with_indices", "aten.max_pool3d_with_indices", "aten.avg_pool1d",
              "aten.avg_pool2d", "aten.avg_pool3d", "aten.adaptive_avg_pool1d",
              "aten.adaptive_avg_pool2d", "aten.adaptive_avg_pool3d", "aten._adaptive_avg_pool2d",
              "aten.adaptive_max_pool1d", "aten.adaptive_max_pool2d", "aten.upsample_nearest2d",
              "aten.upsample_bilinear2d", "aten.upsample_nearest1d", "aten.upsample_linear1d",
              "aten.upsample_bicubic2d"):
    _RULES[_name] = _pool


@_rule("aten.pad", "aten.constant_pad_nd", "aten.reflection_pad1d", "aten.reflection_pad2d",
       "aten.replication_pad1d", "aten.replication_pad2d")
def _pad(p: _Propagator, node: torch.fx.Node, val: Any, where: str) -> list[Term]:
    x = list(_terms(p, node.args[0]))
    pads = list(node.args[1])
    shape = _shape_of(val)
    for i in range(len(pads) // 2):
        d = len(x) - 1 - i
        if pads[2 * i] or pads[2 * i + 1]:
            p.dims.block(x[d], f"{where}: padded")
            x[d] = p.dims.new(shape[d], f"{where}: padded")
    return x


@_rule("aten.index")
def _index(p: _Propagator, node: torch.fx.Node, val: Any, where: str) -> list[Term]:
    x = list(_terms(p, node.args[0]))
    indices = list(node.args[1])
    shape = _shape_of(val)
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


@_rule("aten.index_select", "aten.gather", "aten.take_along_dim")
def _index_select(p: _Propagator, node: torch.fx.Node, val: Any, where: str) -> list[Term]:
    x = list(_terms(p, node.args[0]))
    d = _dim(node.args[1], len(x))
    p.dims.block(x[d], f"{where}: indexed by a tensor")
    name = _op_name(node.target)
    shape = _shape_of(val)
    if name == "aten.index_select":
        x[d] = p.dims.new(shape[d], f"{where}: selected positions")
        return x
    index = _terms(p, node.args[2])
    return [x[i] if i != d and p.dims.size(x[i]) == shape[i] else index[i]
            for i in range(len(shape))]


@_rule("aten.index_put", "aten.index_put_", "aten.index_add", "aten.index_add_",
       "aten.index_copy", "aten.index_copy_", "aten.scatter", "aten.scatter_",
       "aten.scatter_add", "aten.scatter_add_", "aten.index_fill", "aten.index_fill_",
       "aten.masked_scatter", "aten.masked_scatter_")
def _scatter(p: _Propagator, node: torch.fx.Node, val: Any, where: str) -> list[Term]:
    x = list(_terms(p, node.args[0]))
    name = _op_name(node.target)
    shape = _shape_of(val)
    if name.startswith("aten.index_put"):
        indices = list(node.args[1])
        for i, ix in enumerate(indices):
            if ix is not None and i < len(x):
                p.dims.block(x[i], f"{where}: written at tensor positions")
        values = p.value(node.args[2])
        if isinstance(values, list) and values and isinstance(values[0], tuple):
            p.broadcast_terms([x[len(indices):], values[len(values) - (len(x) - len(indices)):]]
                              if len(x) > len(indices) else [], shape[len(indices):], where) \
                if len(x) > len(indices) else None
        return x
    d = _dim(node.args[1], len(x))
    p.dims.block(x[d], f"{where}: written at tensor positions")
    for arg in node.args[2:]:
        other = p.value(arg)
        if isinstance(other, list) and len(other) == len(x):
            for i in range(len(x)):
                if i != d and p.dims.size(other[i]) == p.dims.size(x[i]):
                    p.unify(other[i], x[i], where)
    return x


@_rule("aten.one_hot")
def _one_hot(p: _Propagator, node: torch.fx.Node, val: Any, where: str) -> list[Term]:
    x = _terms(p, node.args[0])
    return [*x, p.dims.new(_shape_of(val)[-1])]


@_rule("aten.histc", "aten.bincount")
def _histc(p: _Propagator, node: torch.fx.Node, val: Any, where: str) -> list[Term]:
    return p.fresh(_shape_of(val))


@_rule("aten.nonzero", "aten.unique", "aten._unique2", "aten.masked_select")
def _data_shaped(p: _Propagator, node: torch.fx.Node, val: Any, where: str) -> Any:
    p.block_value(p.value(node.args[0]), f"{where}: output shape depends on data")
    return p.fresh_like(val, f"{where}: output shape depends on data")


@_rule("aten.where")
def _where(p: _Propagator, node: torch.fx.Node, val: Any, where: str) -> Any:
    if isinstance(val, tuple | list):  # where(condition): nonzero
        return _data_shaped(p, node, val, where)
    return p.broadcast(node, val, where)


@_rule("transformers.grouped_mm_fallback", "aten._grouped_mm")
def _grouped_mm(p: _Propagator, node: torch.fx.Node, val: Any, where: str) -> list[Term]:
    x, w = _terms(p, node.args[0]), _terms(p, node.args[1])
    if len(x) != 2 or len(w) != 3:
        raise _Unsupported("grouped matmul of this rank")
    p.unify(x[-1], w[1], where)
    if len(node.args) > 2 and isinstance(node.args[2], torch.fx.Node):
        offs = _terms(p, node.args[2])
        p.unify(offs[0], w[0], where)
    p.dims.tag(w[0], "experts")
    p.dims.tag(w[1], "expert_features")
    p.dims.tag(w[2], "expert_features")
    return [x[0], w[2]]


@_rule("leantorch.graph_leaf")
def _leaf(p: _Propagator, node: torch.fx.Node, val: Any, where: str) -> Any:
    module, _ = _module_of(node)
    reason = f"passes through the leaf module {module or '(model)'}"
    for arg in node.args[0]:
        p.block_value(p.value(arg), reason)
    return p.fresh_like(val, reason)


# --------------------------------------------------------------------------- groups
_NORM_TYPES = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm,
               nn.modules.instancenorm._InstanceNorm)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORM_TYPES) or "Norm" in type(module).__name__


def _role(module: nn.Module, tensor_name: str, dim: int, ndim: int) -> str:
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
    if _is_norm(module):
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

    def __init__(self, model: nn.Module, propagator: _Propagator, program: Any,
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
        self._moe_rule(model, propagator)
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
                role = _role(module, tensor_name, d, tensor.dim())
                self._members.append(_Member(name, d, term, module_path, role,
                                             tuple(n for n in names if n != name)))
        self._groups = self._make_groups()
        self._sublayers = _find_sublayers(program, propagator, model)

    # ---- construction
    @staticmethod
    def _unseen(model: nn.Module, named: dict[str, torch.Tensor], aliases: dict[int, list[str]],
                p: _Propagator, reason: str) -> dict[str, str]:
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

    def _moe_rule(self, model: nn.Module, p: _Propagator) -> None:
        by_parent: dict[tuple[str, int], list[str]] = {}
        for path, module in model.named_modules():
            count = getattr(module, "num_experts", None)
            if count is None:
                count = getattr(module, "num_local_experts", None)
            if isinstance(count, int) and not isinstance(count, bool) and count > 1 and path:
                parent = path.rpartition(".")[0]
                by_parent.setdefault((parent, count), []).append(path)
        for (_parent, count), paths in by_parent.items():
            axes: list[Term] = []
            for path in paths:
                for name, tensor in model.get_submodule(path).named_parameters(recurse=False):
                    full = f"{path}.{name}"
                    if full in p.param_terms and tensor.dim() >= 2 and tensor.shape[0] == count:
                        axes.append(p.param_terms[full][0])
            if len(axes) < 2:
                continue
            for term in axes[1:]:
                p.unify(axes[0], term, f"experts of {', '.join(paths)}")
            p.dims.tag(axes[0], "experts")

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
                if _repeats_in_product(dims, term, root):
                    reasons.append(f"{member.tensor} dim {member.dim} holds this index space "
                                   "twice")
                    unit_of = torch.full((dims.size(term),), -1, dtype=torch.long)
                else:
                    unit_of = _unit_map(dims, term, root)
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
            unit_of = _unit_map(self._dims, term, group.root)
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
        return self._shapes[tensor]

    def attention_sites(self) -> list[dict[str, Any]]:
        """Attention ops: module path and the groups of their query heads and KV heads."""
        sites = []
        for site in self._attention:
            heads = [self._group_of_root(r) for r in self._dims.atoms(site["heads"])]
            kv = [self._group_of_root(r) for r in self._dims.atoms(site["kv_heads"])]
            sites.append({"module": site["module"],
                          "heads": [g.id for g in heads if g is not None],
                          "kv_heads": [g.id for g in kv if g is not None]})
        return sites

    def _group_of_root(self, root: int) -> Group | None:
        for g in self._groups:
            if g.root == root:
                return g
        return None

    def size_after(self, term: Term, removed: dict[int, Iterable[int]]) -> int:
        """Length of an axis described by ``term`` once ``removed`` units are cut."""
        return int(self._keep(term, removed).numel())

    def size_of(self, term: Term) -> int:
        return self._dims.size(term)

    def term_of(self, tensor: str, dim: int) -> Term:
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
                        _normalize("p", tuple(("a", r) for r in kv))))
        return out

    def norm_terms(self) -> list[tuple[str, list[Term]]]:
        """(module, normalised axes) of every layer/RMS norm op."""
        return list(self._norms)

    def describe(self, prunable: bool | None = None) -> str:
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


def _repeats_in_product(dims: _Dims, term: Term, root: int) -> bool:
    """Whether ``root`` occurs in two factors of one product (a unit would then be ambiguous);
    occurring in several parts of a concatenation is fine."""
    term = dims.resolve(term)
    if term[0] == "a":
        return False
    if term[0] == "s":
        return any(_repeats_in_product(dims, t, root) for t in term[1])
    holders = [t for t in term[1] if root in dims.atoms(t)]
    return len(holders) > 1 or any(_repeats_in_product(dims, t, root) for t in holders)


def _unit_map(dims: _Dims, term: Term, root: int) -> torch.Tensor:
    """For each flat index of ``term``, the unit of atom ``root`` it belongs to (-1: none)."""
    term = dims.resolve(term)
    size = dims.size(term)
    kind = term[0]
    if kind == "a":
        if term[1] == root:
            return torch.arange(size)
        return torch.full((size,), -1, dtype=torch.long)
    if kind == "s":
        return torch.cat([_unit_map(dims, t, root) for t in term[1]])
    sizes = [dims.size(t) for t in term[1]]
    out = torch.full((size,), -1, dtype=torch.long)
    for i, factor in enumerate(term[1]):
        if root not in dims.atoms(factor):
            continue
        local = _unit_map(dims, factor, root)
        shape = [1] * len(sizes)
        shape[i] = sizes[i]
        out = local.view(shape).expand(sizes).reshape(-1).clone()
    return out


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


# --------------------------------------------------------------------------- sublayers
_THROUGH = {"aten.dropout", "aten.dropout_", "aten.alias", "aten.clone", "aten.to",
            "aten._to_copy", "aten.contiguous"}


def _walk_back(node: Any) -> Any:
    """Through ops that do not change values (dropout in eval, dtype no-ops, aliases)."""
    while isinstance(node, torch.fx.Node) and node.op == "call_function" and node.args and \
            _op_name(node.target) in _THROUGH:
        node = node.args[0]
    return node


def _find_sublayers(program: Any, p: _Propagator, model: nn.Module) -> list[Sublayer]:
    """Residual adds ``x + f(x)`` where ``f`` runs entirely inside one child module whose input
    is ``x`` or ``norm(x)`` (pre-norm blocks)."""
    graph = program.graph
    inside: dict[str, list[torch.fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_function":
            for path in _stack_paths(node):
                inside.setdefault(path, []).append(node)
    members = {path: set(nodes) for path, nodes in inside.items()}

    def external_inputs(path: str) -> set[Any]:
        own = members.get(path, set())
        return {arg for n in own for arg in n.all_input_nodes if arg not in own}

    found: dict[str, Sublayer] = {}
    for node in graph.nodes:
        if node.op != "call_function" or _op_name(node.target) not in ("aten.add", "aten.add_"):
            continue
        operands = [a for a in node.args[:2] if isinstance(a, torch.fx.Node)]
        if len(operands) != 2:
            continue
        shapes = [_shape_of(a.meta.get("val")) for a in operands]
        if shapes[0] is None or shapes[0] != shapes[1]:
            continue
        scope = _stack_paths(node)
        for branch, residual in (operands, operands[::-1]):
            source = _walk_back(branch)
            stack = _stack_paths(source) if isinstance(source, torch.fx.Node) else []
            if len(stack) <= len(scope) or stack[:len(scope)] != scope:
                continue
            path = stack[len(scope)]
            if not path or path in found:
                continue
            module = model.get_submodule(path)
            if next(module.parameters(), None) is None or \
                    residual in members.get(path, set()):
                continue
            own = members.get(path, set())
            chain = {branch, source}
            walker = branch
            while walker is not source:
                walker = walker.args[0]
                chain.add(walker)
            if not _closed(own, chain):
                continue
            root = _walk_back(residual)
            norm = None
            fed = False
            for arg in external_inputs(path):
                if _walk_back(arg) is root:
                    fed = True
                    continue
                arg_stack = _stack_paths(arg)
                norms = [q for q in arg_stack if q and _is_norm(model.get_submodule(q))]
                if norms and root in {_walk_back(a) for a in external_inputs(norms[-1])} | \
                        {_walk_back(a) for a in members.get(norms[-1], set())}:
                    fed = True
                    if all(u in own for u in arg.users):
                        norm = norms[-1]
            if not fed:
                continue
            if any(s["module"] == path or s["module"].startswith(path + ".")
                   for s in p.attention):
                kind = "attention"
            elif any(isinstance(m, nn.modules.conv._ConvNd) for m in module.modules()):
                kind = "block"
            else:
                kind = "mlp"
            found[path] = Sublayer(path, kind, norm, scope[-1] if scope else "")
            break
    return list(found.values())


def _closed(own: set[torch.fx.Node], out: set[torch.fx.Node]) -> bool:
    """Only the branch output (``out``: it and the pass-through ops before it) leaves the
    module; other results are unused or only checked."""
    for node in own:
        if node in out:
            continue
        for user in node.users:
            if user in own:
                continue
            if user.op == "call_function" and (_op_name(user.target) in _IGNORED or
                                               (user.target is operator.getitem and
                                                not user.users)):
                continue
            if user in out:
                continue
            return False
    return True


# --------------------------------------------------------------------------- entry point
def default_inputs(model: nn.Module, example_inputs: Any) -> tuple[tuple[Any, ...],
                                                                  dict[str, Any]]:
    """Positional and keyword inputs for tracing: ``use_cache=False`` is added for models whose
    forward takes it (a KV cache object is not a tensor the graph can follow)."""
    args, kwargs = _as_call(example_inputs)
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
    program = _export(model, args, kwargs, leaves)
    propagator = _Propagator(program, model)
    outputs = propagator.run(program.graph)
    propagator.block_value(outputs, "reaches a model output")
    # The training-mode forward may run modules the eval-mode one never reaches (an auxiliary
    # head, a distillation projection): trace it too and merge its couplings, so that such a
    # module is cut together with the layer feeding it.
    modes = ["eval"]
    unseen_reason = "neither the eval- nor the training-mode forward reads it"
    try:
        train_program = _export(model, args, kwargs, leaves, training=True)
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
