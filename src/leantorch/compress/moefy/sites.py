"""Where a model's dense FFNs are: found through the dependency graph, not by module names.

A dense FFN is a hidden layer between projections: the output rows of one linear (two for a
gated FFN: gate and up) and the input columns of the next linear count the same hidden units,
and an element-wise activation sits between them. :func:`leantorch.compress.graph.build_graph`
finds exactly these couplings: each ``"neurons"`` group whose tensors are the input
projection(s)' rows (and biases) and the output projection's columns, nothing else, is a
candidate. One forward on the example inputs (eval mode, hooks only) then says

* which activation it is: a parameter-free module fed by the input projection is identified on
  a probe vector (:func:`_identify_activation`); a functional one by the values that reach the
  output projection (``act(x W_in + b_in)``, gated ``act(x W_gate) * (x W_up)``, for each of
  leantorch's activations; which projection is the gate is found the same way);
* which module to replace: the smallest module holding all the projections whose output is the
  FFN of its input (``nn.Sequential``, Llama's or GPT-2's ``mlp``: the MoE layer replaces it;
  an output dropout inside it moves into the MoE layer), or, when the output projection lives
  elsewhere (BERT's ``intermediate`` -> ``output.dense``), a module whose output is the hidden
  units and goes straight into the output projection: the MoE layer replaces that module and
  the output projection becomes ``Identity``.

Every check compares values on the example inputs to float rounding, so a candidate that is not
exactly an FFN (an unknown activation, a norm or a scale between the projections, the hidden
units read by something else, a module doing other work besides) is skipped with the reason,
never converted into a different function. leantorch's own
:class:`~leantorch.nn.moe.FeedForward` knows its activation and layout and needs no inputs.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from leantorch.compress.change import _patterns, replace_module
from leantorch.compress.graph import Group, build_graph, default_inputs
from leantorch.errors import LeanError
from leantorch.nn.moe import FeedForward, MoE
from leantorch.ops.moe.dispatch import ACTIVATIONS, activation_fn
from leantorch.validate import positive_int

__all__ = ["FFNSite", "find_ffns", "search_ffns"]


@dataclass
class FFNSite:
    """One dense FFN of a model, in leantorch's weight layout.

    ``path``: the module replaced by the MoE layer; ``kind``: how it was laid out:
    ``"leantorch"`` (a :class:`~leantorch.nn.moe.FeedForward`), ``"gated"`` (gate and up
    projections), ``"sequential"`` (an ``nn.Sequential``), ``"gpt2"`` (transformers'
    ``Conv1D`` projections), ``"bert"`` (the output projection lives outside ``path``, BERT's
    layout) or ``"dense"`` (any other module computing exactly the FFN); ``identity_path``: a
    module that becomes ``Identity`` (the output projection, for ``"bert"``, whose work moves
    into the MoE); ``w_in (dim, hidden)`` or ``(dim, 2*hidden)`` gate columns first;
    ``w_out (hidden, dim)``; ``dropout``: output dropout the MoE layer takes over (GPT-2).
    """

    path: str
    kind: str
    activation: str
    gated: bool
    w_in: Tensor = field(repr=False)
    w_out: Tensor = field(repr=False)
    b_in: Tensor | None = field(default=None, repr=False)
    b_out: Tensor | None = field(default=None, repr=False)
    identity_path: str | None = None
    dropout: float = 0.0

    @property
    def dim(self) -> int:
        """Model width: the rows of ``w_in``."""
        return self.w_in.shape[0]

    @property
    def hidden(self) -> int:
        """The FFN's hidden width: the rows of ``w_out``."""
        return self.w_out.shape[0]

    def hidden_units(self, x: Tensor) -> Tensor:
        """The hidden activations ``(..., hidden)`` of inputs ``x (..., dim)``."""
        act = activation_fn(self.activation)
        flat = x.reshape(-1, self.dim)
        h = flat @ self.w_in if self.b_in is None else torch.addmm(self.b_in, flat, self.w_in)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = act(gate) * up
        else:
            h = act(h)
        return h.reshape(*x.shape[:-1], self.hidden)

    def forward(self, x: Tensor) -> Tensor:
        """The dense FFN (without dropout). ``x (..., dim)`` -> ``(..., dim)``."""
        y = self.hidden_units(x) @ self.w_out
        return y if self.b_out is None else y + self.b_out


_PROBE = torch.linspace(-4, 4, 97, dtype=torch.float64)


def _identify_activation(module: nn.Module) -> str | None:
    """Which of leantorch's activations ``module`` computes (checked on a probe vector)."""
    try:
        with torch.no_grad():
            out = module(_PROBE)
    except Exception:
        return None
    if not isinstance(out, Tensor) or out.shape != _PROBE.shape:
        return None
    for name, fn in ACTIVATIONS.items():
        if torch.allclose(out.double(), fn(_PROBE), rtol=1e-6, atol=1e-7):
            return name
    return None


def _linear_t(linear: nn.Module) -> tuple[Tensor, Tensor | None]:
    """(in, out) weight and bias of an ``nn.Linear`` or a transformers ``Conv1D``."""
    if isinstance(linear, nn.Linear):
        return linear.weight.detach().t(), None if linear.bias is None else linear.bias.detach()
    # transformers' Conv1D stores the weight as (in, out) already
    return linear.weight.detach(), None if linear.bias is None else linear.bias.detach()


def _is_linear(module: Any) -> bool:
    return isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and
                                             hasattr(module, "nf"))


def _feedforward_site(path: str, module: FeedForward) -> FFNSite:
    return FFNSite(path, "leantorch", module.activation, module.gated,
                   module.w_in.detach(), module.w_out.detach(),
                   None if module.b_in is None else module.b_in.detach(),
                   None if module.b_out is None else module.b_out.detach())


# --------------------------------------------------------------------------- one recorded run
@dataclass
class _Call:
    """The first call of a module: its positional and keyword inputs and its output."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: Any

    def only_input(self) -> Tensor | None:
        """The input when the module took exactly one tensor (and no other input)."""
        extra = [v for v in self.kwargs.values() if v is not None]
        if len(self.args) == 1 and isinstance(self.args[0], Tensor) and not extra:
            return self.args[0]
        return None


def _record(model: nn.Module, paths: Sequence[str], example_inputs: Any) -> dict[str, _Call]:
    """Run ``model`` once on ``example_inputs`` (eval mode, no gradients) and record the first
    call of each module at ``paths``. Modes and hooks are restored afterwards."""
    calls: dict[str, _Call] = {}
    handles = []
    for path in dict.fromkeys(paths):
        def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any,
                 path: str = path) -> None:
            calls.setdefault(path, _Call(args, dict(kwargs), output))
        handles.append(model.get_submodule(path).register_forward_hook(hook, with_kwargs=True))
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        args, kwargs = default_inputs(model, example_inputs)
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training
    return calls


def _close(value: Any, reference: Tensor) -> bool:
    """``value`` equals ``reference`` to the rounding of ``value``'s dtype (relative to the
    largest entry), shapes equal."""
    if not isinstance(value, Tensor) or value.shape != reference.shape:
        return False
    eps = torch.finfo(value.dtype).eps if value.dtype.is_floating_point else 0.0
    tolerance = min(0.05, 256 * eps)
    error = (value.double() - reference.double()).abs().max() if value.numel() else 0.0
    scale = reference.double().abs().max() if reference.numel() else 0.0
    return bool(error <= tolerance * max(float(scale), 1e-30))


# --------------------------------------------------------------------------- graph candidates
def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def _ancestors(path: str) -> list[str]:
    """``path``'s ancestors, innermost first, without the model itself (``""``)."""
    out = []
    while path:
        path = _parent(path)
        if path:
            out.append(path)
    return out


def _common(paths: Sequence[str]) -> str:
    parts = [p.split(".") for p in paths]
    prefix = []
    for items in zip(*parts, strict=False):
        if any(i != items[0] for i in items):
            break
        prefix.append(items[0])
    return ".".join(prefix)


def _inside(path: str, scope: str) -> bool:
    return not scope or path == scope or path.startswith(scope + ".")


@dataclass
class _Candidate:
    producers: list[str]  # the input projection(s): one, or gate and up in some order
    reader: str  # the output projection
    scope: str  # the innermost module holding all of them ("" is the model)


def _candidate(group: Group, model: nn.Module) -> _Candidate | str | None:
    """The projections of a neurons group shaped like an FFN's hidden layer; a reason (str)
    when it has input and output projections but cannot be converted; None when it is no
    hidden layer at all (a head, a pooler: nothing reads it with a projection)."""
    producers = list(dict.fromkeys(t.module for t in group.tensors if t.role == "out"))
    readers = list(dict.fromkeys(t.module for t in group.tensors if t.role == "in"))
    if not producers or not readers:
        return None
    scope = _common(producers + readers)
    not_linear = [p for p in producers + readers if not _is_linear(model.get_submodule(p))]
    if (not_linear or len(readers) > 1 or len(producers) > 2) and not group.prunable:
        return None  # a model's width (its input, a residual stream): no hidden layer
    if not_linear:
        module = model.get_submodule(not_linear[0])
        return f"{not_linear[0]} ({type(module).__name__}) is not a linear layer"
    if len(readers) > 1:
        return f"the hidden units feed {', '.join(readers)}: one output projection expected"
    if len(producers) > 2:
        return (f"{len(producers)} projections ({', '.join(producers)}) produce the hidden "
                "units: one (or gate and up) expected")
    if readers[0] in producers:
        return f"{readers[0]} both produces and reads the hidden units"
    others = [f"{t.tensor} ({t.role})" for t in group.tensors
              if not ((t.role in ("out", "bias") and t.module in producers) or
                      (t.role == "in" and t.module == readers[0]))]
    if others:
        return f"the hidden units are also read by {', '.join(others[:4])}"
    if not group.prunable:
        return "; ".join(group.reasons)
    if not group.exact:
        return "; ".join(group.inexact_reasons)
    for t in group.tensors:
        if t.unit_of is None or not torch.equal(t.unit_of, torch.arange(t.size)):
            return f"{t.tensor} dim {t.dim} does not hold one index per hidden unit"
    return _Candidate(producers, readers[0], scope)


def _param_free(module: nn.Module) -> bool:
    return next(module.parameters(), None) is None


_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
             nn.FeatureAlphaDropout)


def _activation_of(candidate: _Candidate, calls: dict[str, _Call], model: nn.Module,
                   pre: list[Tensor], hidden: Tensor) -> tuple[str, int] | str:
    """``(activation name, index of the gate projection)``, or the reason there is none."""
    modules = []
    for path, call in calls.items():
        module = model.get_submodule(path)
        if _inside(path, candidate.scope) and _param_free(module) and \
                not isinstance(module, _DROPOUTS) and call.args and \
                any(call.args[0] is p for p in pre):
            modules.append((path, module, next(i for i, p in enumerate(pre)
                                              if call.args[0] is p)))
    gated = len(pre) == 2
    if modules:
        # a module applies the activation: identify it on the probe
        path, module, gate = modules[0]
        name = _identify_activation(module)
        if name is None:
            return (f"{path} ({type(module).__name__}) is not one of leantorch's activations "
                    f"({', '.join(ACTIVATIONS)})")
        choices = [(name, gate)]
    else:  # a functional activation: try each one (and each projection as the gate)
        choices = [(name, gate) for name in ACTIVATIONS for gate in range(len(pre))]
    if any(p.shape != hidden.shape for p in pre):
        return (f"the hidden units {tuple(hidden.shape)} and the projections' outputs "
                f"{[tuple(p.shape) for p in pre]} differ in shape")

    def hidden_of(name: str, gate: int) -> Tensor:
        value = ACTIVATIONS[name](pre[gate].double())
        return value * pre[1 - gate].double() if gated else value

    target = hidden.double()
    errors = {choice: float((hidden_of(*choice) - target).abs().max()) if target.numel()
              else 0.0 for choice in choices}
    best = min(errors, key=errors.__getitem__)  # gelu and gelu_tanh differ by ~1e-3 at most
    if _close(hidden, hidden_of(*best)):
        return best
    shape = "act(gate) * up" if gated else "act(x W_in + b_in)"
    return (f"what reaches {candidate.reader} is not {shape} of "
            f"{' and '.join(candidate.producers)} for any activation in "
            f"{', '.join(ACTIVATIONS)} (another operation sits between them)")


def _site_of(candidate: _Candidate, calls: dict[str, _Call], model: nn.Module
             ) -> FFNSite | str:
    """The site of a graph candidate, checked on the recorded run; or why it is skipped."""
    names = [*candidate.producers, candidate.reader]
    missing = [p for p in names if p not in calls]
    if missing:
        return f"{', '.join(missing)} did not run on the example inputs"
    pre = [calls[p].output for p in candidate.producers]
    x = calls[candidate.producers[0]].args[0]
    hidden = calls[candidate.reader].args[0] if calls[candidate.reader].args else None
    if not all(isinstance(t, Tensor) for t in (*pre, x, hidden)):
        return f"{', '.join(names)} were not called with and on tensors"
    if any(calls[p].args[0] is not x and not torch.equal(calls[p].args[0], x)
           for p in candidate.producers[1:]):
        return f"{' and '.join(candidate.producers)} read different inputs"
    found = _activation_of(candidate, calls, model, pre, hidden)
    if isinstance(found, str):
        return found
    activation, gate = found
    producers = candidate.producers
    if len(producers) == 2:
        producers = [producers[gate], producers[1 - gate]]  # gate columns first
    weights = [_linear_t(model.get_submodule(p)) for p in producers]
    if len({b is None for _, b in weights}) > 1:
        return f"only one of {' and '.join(producers)} has a bias"
    w_in = torch.cat([w for w, _ in weights], dim=1)
    b_in = None if weights[0][1] is None else torch.cat([b for _, b in weights])
    w_out, b_out = _linear_t(model.get_submodule(candidate.reader))
    gated = len(producers) == 2
    site = FFNSite("", "", activation, gated, w_in, w_out, b_in, b_out)
    # (a) a module whose output is exactly the FFN of its input: it becomes the MoE layer
    scope = candidate.scope
    while scope and scope not in calls:  # a ModuleList/Dict is never called itself
        scope = _parent(scope)
    if scope:
        call = calls[scope]
        x_scope = call.only_input()
        if x_scope is not None and x_scope.shape[-1:] == x.shape[-1:] and \
                _close(call.output, site.forward(x_scope.to(w_in.dtype)).to(x_scope.dtype)):
            dropout = _output_dropout(scope, candidate.reader, calls, model)
            if isinstance(dropout, str):
                return dropout
            module = model.get_submodule(scope)
            kind = ("gated" if gated else "gpt2" if type(
                model.get_submodule(candidate.reader)).__name__ == "Conv1D" else
                    "sequential" if isinstance(module, nn.Sequential) else "dense")
            site.path, site.kind, site.dropout = scope, kind, dropout
            return site
    # (b) a module that computes the hidden units and hands them straight to the output
    # projection (BERT's intermediate -> output.dense): the projection becomes Identity
    start = _common(candidate.producers)
    for path in [start, *_ancestors(start)]:
        if not _inside(path, scope) or path == scope or path not in calls:
            continue
        call = calls[path]
        x_path = call.only_input()
        if x_path is None or call.output is not hidden or x_path.shape[-1:] != x.shape[-1:]:
            continue
        if _close(hidden, site.hidden_units(x_path.to(w_in.dtype)).to(hidden.dtype)):
            # no output inside this module: any dropout in it acts on the hidden units
            dropout = _output_dropout(path, "", calls, model)
            if isinstance(dropout, str):
                return dropout
            site.path, site.kind, site.identity_path = path, "bert", candidate.reader
            return site
    where = f"inside {scope}" if scope else "in the model itself"
    return (f"no module computes exactly this FFN ({' -> '.join(names)} run {where} together "
            "with other work): put the projections and the activation in a module of their "
            "own")


def _output_dropout(scope: str, reader: str, calls: dict[str, _Call], model: nn.Module
                    ) -> float | str:
    """The probability of the dropout applied to the output projection's result inside
    ``scope`` (0 if none); a reason when dropout sits anywhere else in the FFN."""
    p_out = 0.0
    for path, call in calls.items():
        module = model.get_submodule(path)
        if not _inside(path, scope) or not isinstance(module, _DROPOUTS) or module.p == 0:
            continue
        if reader and call.args and call.args[0] is calls[reader].output:
            p_out = float(module.p)
        else:
            return (f"{path} applies dropout (p={module.p}) inside the FFN, not to its "
                    "output; the MoE layer only has output dropout")
    return p_out


# --------------------------------------------------------------------------- search
def search_ffns(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
) -> tuple[list[FFNSite], dict[str, str]]:
    """The dense FFNs of ``model`` that moefy can convert (see the module docstring) and, by
    path, the FFN-shaped layers it cannot, with the reason. ``include`` / ``exclude``: globs
    over the sites' paths.

    ``example_inputs`` (a tensor, a tuple of inputs, a mapping of keyword inputs, or
    ``(args, kwargs)``) are traced to find FFNs built from ``nn.Linear`` (or transformers'
    ``Conv1D``); without them only leantorch :class:`~leantorch.nn.moe.FeedForward` modules
    are found, and the skipped reasons say so if the model has linear layers."""
    includes = _patterns("include", include)
    excludes = _patterns("exclude", exclude) or []

    def chosen(path: str) -> bool:
        if includes is not None and not any(fnmatch.fnmatchcase(path, p) for p in includes):
            return False
        return not any(fnmatch.fnmatchcase(path, p) for p in excludes)

    order = {path: i for i, (path, _) in enumerate(model.named_modules())}
    sites: list[FFNSite] = []
    skipped: dict[str, str] = {}
    moe_scopes = [p for p, m in model.named_modules() if isinstance(m, MoE)]
    for path, module in model.named_modules():
        # the model itself is never a site: a transform edits the model, it cannot swap it
        if path and isinstance(module, FeedForward) and \
                not any(_inside(path, s) for s in moe_scopes) and chosen(path):
            sites.append(_feedforward_site(path, module))
    if example_inputs is None:
        if any(_is_linear(m) for m in model.modules()):
            skipped["(model)"] = ("FFNs built from linear layers are found by tracing the "
                                  "model: pass example_inputs=<model inputs>")
        return sites, skipped
    graph = build_graph(model, example_inputs)
    candidates: list[_Candidate] = []
    for group in graph.groups(kind="neurons"):
        found = _candidate(group, model)
        if found is None:
            continue
        key = found.scope if isinstance(found, _Candidate) else _common(
            [t.module for t in group.tensors]) or group.name
        if any(_inside(key, s) for s in moe_scopes):
            continue
        if isinstance(found, str):
            if chosen(key):
                skipped[key] = found
            continue
        candidates.append(found)
    if candidates:
        watch: list[str] = []
        for c in candidates:
            for path in (*c.producers, c.reader):
                watch += [path, *_ancestors(path)]
            watch += [p for p, m in model.named_modules()
                      if p and _inside(p, c.scope) and _param_free(m)]
        calls = _record(model, watch, example_inputs)
        for c in candidates:
            site = _site_of(c, calls, model)
            if isinstance(site, str):
                if chosen(c.scope or c.reader):
                    skipped[c.scope or c.reader] = site
            elif chosen(site.path) and not any(site.path == s.path for s in sites):
                sites.append(site)
    sites.sort(key=lambda s: order[s.path])
    return sites, skipped


def find_ffns(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
) -> list[FFNSite]:
    """The dense FFNs of ``model`` that moefy can convert, selected by ``include`` /
    ``exclude`` globs over their paths; :func:`search_ffns` also says why the other FFN-shaped
    layers are left alone. ``example_inputs`` are needed for FFNs built from linear layers (see
    the module docstring).

    Example::

        >>> [(s.path, s.kind) for s in find_ffns(bert, {"input_ids": ids})]  # doctest: +SKIP
        [('encoder.layer.0.intermediate', 'bert'), ('encoder.layer.1.intermediate', 'bert')]
    """
    return search_ffns(model, example_inputs, include=include, exclude=exclude)[0]


# --------------------------------------------------------------------------- using a site
def moe_for(site: FFNSite, hidden: int, num_experts: int, k: int, *, bias: bool | str,
            output_bias: bool, gates: str, router_bias: bool, moe_args: dict[str, Any]) -> MoE:
    """An (untrained) :class:`~leantorch.nn.moe.MoE` shaped for ``site`` on its device and
    dtype; ``moe_args`` may not repeat what the site sets."""
    args = {"activation": site.activation, "gated": site.gated, "bias": bias,
            "output_bias": output_bias, "gates": gates, "router_bias": router_bias,
            "dropout": site.dropout}
    clash = sorted(set(args) & set(moe_args))
    if clash:
        raise LeanError(f"moefy: {', '.join(clash)} are set by the FFN being converted; "
                        "leave them out of the MoE options")
    moe = MoE(site.dim, hidden, num_experts, k, **args, **moe_args)
    return moe.to(device=site.w_in.device, dtype=site.w_in.dtype)


def replace_site(target: nn.Module, site: FFNSite, moe: MoE) -> None:
    """Put ``moe`` at ``site.path`` (and ``Identity`` at ``site.identity_path``)."""
    replace_module(target, site.path, moe)
    if site.identity_path is not None:
        replace_module(target, site.identity_path, nn.Identity())


def check_k(owner: str, num_experts: int, k: int) -> None:
    """``num_experts`` and ``k`` are positive integers with ``k <= num_experts``."""
    positive_int(owner, "num_experts", num_experts)
    positive_int(owner, "k", k)
    if k > num_experts:
        raise LeanError(f"{owner}: k={k} is more than num_experts={num_experts}; expected "
                        f"1 <= k <= num_experts")


def transform_sites(target: nn.Module, owner: str, example_inputs: Any,
                    calibration: Sequence[Any] | None, include: Any, exclude: Any,
                    skipped: dict[str, str]) -> list[FFNSite]:
    """The sites a moefy transform converts: traced on ``example_inputs`` (else the first
    calibration batch); the layers it leaves alone go into ``skipped``. Raises when there are
    none, saying why."""
    inputs = example_inputs
    if inputs is None and calibration:
        inputs = calibration[0]
    sites, left = search_ffns(target, inputs, include=include, exclude=exclude)
    skipped.update(left)
    if not sites:
        why = "; ".join(f"{path}: {reason}" for path, reason in list(left.items())[:4])
        raise LeanError(f"{owner}: no dense FFN matched include={include!r} exclude={exclude!r} "
                        f"in {type(target).__name__}" + (f" ({why})" if why else "") +
                        " (a model that is itself one FFN: wrap it, or convert the site that "
                        "find_ffns returns with split_ffn / upcycle_ffn)")
    return sites
