"""Cost formulas for aten ops, and ``register_formula`` for everyone else's.

A formula receives an :class:`OpCall` (the op, its arguments bound by name, and its real
outputs) and returns a :class:`Cost`. The counter calls it after the op has run, so formulas see
the shapes that actually executed: a routed MoE costs the tokens each expert received.

Conventions (the README's "Measurement" section is the long form):

* ``macs`` are multiply-accumulates of matmul-class ops (mm, conv, attention, grouped mm).
* ``flops`` are all floating-point operations, a MAC counting as two. So
  ``flops = 2 * macs + other`` where ``other`` is the non-matmul work: bias adds, softmax,
  norms, activations, reductions. Integer-only index arithmetic costs no FLOPs.
* Causal attention counts the (query, key) pairs the causal mask keeps; a kernel that computes
  the full matrix and then masks it (the ``math`` backend) is counted as what it computes.
* Ops that only move data (copies, concatenation, gathers, dtype casts) cost 0 FLOPs but their
  bytes are counted; views cost nothing at all.
* An op with no formula is reported under ``uncounted``: it is never silently 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from leantorch.errors import LeanError, describe

__all__ = [
    "Cost",
    "Formula",
    "OpCall",
    "attention_pairs",
    "get_formula",
    "register_formula",
    "registered_ops",
    "tensor_bytes",
]

aten = torch.ops.aten


@dataclass(frozen=True)
class Cost:
    """What one op call costs.

    Args:
        flops: all floating-point operations; defaults to ``2 * macs``.
        macs: multiply-accumulates of matmul-class work (each is 2 of the ``flops``).
        bytes_read / bytes_written: override the counter's default, which is the footprint of
            every tensor argument read and every tensor output written. Use it for ops that
            touch only part of an input (an embedding reads the rows it looks up).
    """

    flops: int | None = None
    macs: int = 0
    bytes_read: int | None = None
    bytes_written: int | None = None

    def __post_init__(self) -> None:
        macs = int(self.macs)
        flops = 2 * macs if self.flops is None else int(self.flops)
        if macs < 0 or flops < 0:
            raise LeanError(f"Cost: flops and macs must be >= 0, got flops={flops}, macs={macs}")
        if flops < 2 * macs:
            raise LeanError(
                f"Cost: flops ({flops}) must include the 2 FLOPs of every MAC ({macs} MACs): "
                f"pass flops >= {2 * macs}, or leave flops out to mean exactly 2 * macs"
            )
        for name in ("bytes_read", "bytes_written"):
            value = getattr(self, name)
            if value is not None and int(value) < 0:
                raise LeanError(f"Cost: {name} must be >= 0 or None, got {value}")
        object.__setattr__(self, "macs", macs)
        object.__setattr__(self, "flops", flops)


NO_WORK = Cost(0, 0, bytes_read=0, bytes_written=0)  # views and metadata: nothing moves


class OpCall:
    """One executed op, as a formula sees it.

    ``call.arg("name")`` reads an argument by its schema name whether it was passed by position
    or keyword (falling back to the schema default); ``call.outputs`` are the output tensors.
    """

    __slots__ = ("_named", "args", "func", "kwargs", "out")

    def __init__(self, func: Any, args: Sequence[Any], kwargs: dict[str, Any], out: Any) -> None:
        self.func = func
        self.args = tuple(args)
        self.kwargs = dict(kwargs)
        self.out = out
        self._named: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        """The aten op's name, e.g. ``"aten.mm"``."""
        return op_name(self.func)

    def _bind(self) -> dict[str, Any]:
        if self._named is None:
            named: dict[str, Any] = {}
            schema = getattr(self.func, "_schema", None)
            if schema is not None:
                position = 0
                for argument in schema.arguments:
                    if not argument.kwarg_only and position < len(self.args):
                        named[argument.name] = self.args[position]
                        position += 1
                    elif argument.name in self.kwargs:
                        named[argument.name] = self.kwargs[argument.name]
                    elif argument.has_default_value():
                        named[argument.name] = argument.default_value
            self._named = named
        return self._named

    def arg(self, name: str, default: Any = None) -> Any:
        """The argument called ``name`` in the op's schema (``default`` when absent or None)."""
        value = self._bind().get(name, self.kwargs.get(name))
        return default if value is None else value

    @property
    def inputs(self) -> list[torch.Tensor]:
        """Every tensor among the arguments, in order (lists of tensors flattened)."""
        flat, _ = tree_flatten((self.args, self.kwargs))
        return [t for t in flat if isinstance(t, torch.Tensor)]

    @property
    def outputs(self) -> list[torch.Tensor]:
        """Every tensor the op returned, in order (tuples and lists flattened)."""
        flat, _ = tree_flatten(self.out)
        return [t for t in flat if isinstance(t, torch.Tensor)]

    @property
    def output(self) -> torch.Tensor:
        """The first output tensor."""
        outs = self.outputs
        if not outs:
            raise LeanError(f"{self.name} returned no tensor")
        return outs[0]

    def is_floating(self) -> bool:
        """True when any input or output tensor is floating point or complex."""
        return any(t.is_floating_point() or t.is_complex() for t in self.inputs + self.outputs)


Formula = Callable[[OpCall], "Cost | int"]
_REGISTRY: dict[Any, Formula] = {}


def op_name(func: Any) -> str:
    """``aten.mm`` style name of an op overload or packet (the overload name dropped)."""
    packet = getattr(func, "overloadpacket", func)
    qualified = getattr(packet, "_qualified_op_name", None)
    if qualified:
        return qualified.replace("::", ".")
    return getattr(packet, "__name__", None) or str(packet)


def _resolve(op: Any) -> Any:
    if isinstance(op, torch._ops.OpOverload | torch._ops.OpOverloadPacket):
        return op
    if isinstance(op, str):
        qualified = op.replace("::", ".")
        parts = qualified.split(".")
        if len(parts) in (2, 3):
            try:
                packet = getattr(getattr(torch.ops, parts[0]), parts[1])
                return getattr(packet, parts[2]) if len(parts) == 3 else packet
            except (AttributeError, RuntimeError):
                pass
        raise LeanError(
            f"register_formula: op={op!r} is not a registered torch op; pass an OpOverload such "
            "as torch.ops.aten.mm.default, a packet such as torch.ops.mylib.myop, or a string "
            "'namespace::name[.overload]'"
        )
    if isinstance(op, torch._ops.HigherOrderOperator):
        return op
    raise LeanError(
        f"register_formula: op must be a torch op (OpOverload, OpOverloadPacket or "
        f"'namespace::name' string), got {type(op).__name__} {describe(op)}"
    )


def register_formula(op: Any, fn: Formula | None = None) -> Any:
    """Register the cost of ``op``: ``fn(call: OpCall) -> Cost`` (an ``int`` means FLOPs).

    Registering a packet (``torch.ops.mylib.myop``) covers all its overloads; an overload
    (``torch.ops.mylib.myop.default``) takes precedence over its packet. Re-registering replaces.
    Usable as a decorator: ``@register_formula(torch.ops.mylib.myop)``.

    Example::

        @register_formula("mylib::scaled_matmul")
        def _(call):
            a, b = call.arg("a"), call.arg("b")
            return Cost(macs=a.shape[0] * a.shape[1] * b.shape[1])
    """
    key = _resolve(op)

    def register(f: Formula) -> Formula:
        if not callable(f):
            raise LeanError(
                f"register_formula: fn must be callable(call) -> Cost, got {describe(f)}"
            )
        _REGISTRY[key] = f
        return f

    return register if fn is None else register(fn)


def get_formula(func: Any) -> Formula | None:
    """The formula that applies to ``func`` (overload first, then its packet), or None."""
    formula = _REGISTRY.get(func)
    if formula is None:
        formula = _REGISTRY.get(getattr(func, "overloadpacket", None))
    return formula


def registered_ops() -> list[str]:
    """Names of every op with a formula, sorted."""
    return sorted({op_name(k) for k in _REGISTRY})


def _register_many(names: Iterable[str], fn: Formula, namespace: Any = aten) -> None:
    """Register ``fn`` for every named packet that exists, with its in-place ``name_`` twin."""
    for name in names:
        for variant in (name, name + "_"):
            packet = getattr(namespace, variant, None)
            if packet is not None:
                _REGISTRY[packet] = fn


# --------------------------------------------------------------------------- helpers
def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a kernel touches to read or write ``t``: broadcast (stride 0) dims count once."""
    if t.numel() == 0:
        return 0
    elements = 1
    for size, stride in zip(t.shape, t.stride(), strict=True):
        if stride != 0:
            elements *= size
    return elements * t.element_size()


def _numel(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel()


def _prod(values: Iterable[int]) -> int:
    return math.prod(int(v) for v in values)


def _elementwise(per_element: int) -> Formula:
    def formula(call: OpCall) -> Cost:
        if not call.is_floating():
            return Cost(0)
        return Cost(per_element * call.output.numel())

    formula.__doc__ = f"{per_element} FLOP(s) per output element (0 for integer-only ops)."
    return formula


def _data_movement(call: OpCall) -> Cost:
    """Copies, casts, concatenation, padding, fills: no arithmetic, bytes counted."""
    return Cost(0)


def _allocation(call: OpCall) -> Cost:
    """``empty``-style ops: memory is reserved, nothing is computed or written."""
    return Cost(0, bytes_read=0, bytes_written=0)


def _no_work(call: OpCall) -> Cost:
    return NO_WORK


# --------------------------------------------------------------------------- elementwise
# FLOPs per output element. A transcendental (exp, log, erf, tanh, sqrt...) counts as one.
_ELEMENTWISE: dict[int, tuple[str, ...]] = {
    1: (
        "add", "sub", "rsub", "mul", "div", "true_divide", "neg", "abs", "relu", "reciprocal",
        "sqrt", "rsqrt", "exp", "exp2", "expm1", "log", "log2", "log10", "log1p", "sin", "cos",
        "tan", "tanh", "sinh", "cosh", "asin", "acos", "atan", "atan2", "erf", "erfc", "erfinv",
        "pow", "square", "sign", "sgn", "floor", "ceil", "round", "trunc", "frac", "fmod",
        "remainder", "floor_divide", "maximum", "minimum", "fmax", "fmin", "eq", "ne", "lt",
        "le", "gt", "ge", "logical_and", "logical_or", "logical_xor", "logical_not",
        "bitwise_and", "bitwise_or", "bitwise_xor", "bitwise_not", "where", "masked_fill",
        "threshold", "clamp_min", "clamp_max", "copysign", "isnan", "isinf", "isfinite",
        "nan_to_num", "threshold_backward", "heaviside", "bernoulli", "xlogy", "angle",
        # inverse hyperbolics, unit conversions and special functions: one transcendental each
        "acosh", "asinh", "atanh", "deg2rad", "rad2deg", "lgamma", "digamma", "polygamma", "i0",
        "igamma", "igammac", "nextafter", "gcd", "lcm",
        "bitwise_left_shift", "bitwise_right_shift", "__lshift__", "__rshift__", "__ilshift__",
        "__irshift__",
    ),
    # clamp to [min, max] (hardtanh, relu6); leaky_relu and rrelu: compare + multiply;
    # ldexp = x * 2^e; _add_relu = add + relu
    2: ("hardtanh", "relu6", "leaky_relu", "hypot", "hardtanh_backward", "leaky_relu_backward",
        "rrelu_with_noise", "ldexp", "_add_relu"),
    # sigmoid = exp, add, divide; softplus = exp, add, log; elu = exp, sub, mul (and compare);
    # addcmul/addcdiv/lerp = multiply/divide, scale, add; tanh/sigmoid backward = 3 ops;
    # sinc = sin(pi x) / (pi x): multiply, sine, divide.
    3: (
        "sigmoid", "softplus", "elu", "celu", "addcmul", "addcdiv", "lerp", "logit",
        "sigmoid_backward", "tanh_backward", "log_sigmoid_forward", "sinc",
    ),
    4: ("silu", "hardsigmoid", "selu"),  # silu = sigmoid (3) + multiply
    5: ("hardswish", "mish"),  # x * relu6(x + 3) / 6; x * tanh(softplus(x))
    8: ("silu_backward", "hardswish_backward", "hardsigmoid_backward", "mish_backward",
        "elu_backward", "softplus_backward", "log_sigmoid_backward"),
}
for _per, _names in _ELEMENTWISE.items():
    _register_many(_names, _elementwise(_per))


def _gelu(call: OpCall) -> Cost:
    # exact: 0.5 * x * (1 + erf(x / sqrt 2)) = 5; tanh form: 0.5x(1 + tanh(c(x + 0.044715x^3))) = 9
    per = 9 if call.arg("approximate", "none") == "tanh" else 5
    return Cost(per * call.output.numel())


def _gelu_backward(call: OpCall) -> Cost:
    # g * (Phi(x) + x * phi(x)): Phi via erf (3), phi via exp (4), x*phi, add, *g
    per = 14 if call.arg("approximate", "none") == "tanh" else 10
    return Cost(per * call.output.numel())


def _clamp(call: OpCall) -> Cost:
    if not call.is_floating():
        return Cost(0)
    bounds = (call.arg("min") is not None) + (call.arg("max") is not None)
    return Cost(max(bounds, 1) * call.output.numel())


def _dropout(call: OpCall) -> Cost:
    # train: draw + compare for the mask, multiply by mask and 1/(1-p); eval: identity copy
    train = call.arg("train", True)
    return Cost(2 * call.output.numel() if train and call.arg("p", 0.0) > 0 else 0)


def _mask_scale(call: OpCall) -> Cost:
    return Cost(2 * call.output.numel())  # native_dropout_backward: grad * mask * scale


def _conj_physical(call: OpCall) -> Cost:
    # complex: negate each imaginary part; real: a copy
    return Cost(call.output.numel() if call.output.is_complex() else 0)


def _mvlgamma(call: OpCall) -> Cost:
    # log of the multivariate gamma: a constant plus the sum over i < p of lgamma(x - i/2);
    # each of the p terms is a subtract, an lgamma and an add, per output element
    return Cost(3 * int(call.arg("p", 1)) * call.output.numel())


_register_many(("gelu",), _gelu)
_register_many(("mvlgamma",), _mvlgamma)
_register_many(("conj_physical",), _conj_physical)
_register_many(("gelu_backward",), _gelu_backward)
_register_many(("clamp",), _clamp)
_register_many(("native_dropout",), _dropout)
_register_many(("native_dropout_backward",), _mask_scale)


# --------------------------------------------------------------------------- reductions
def _reduction(per_input: int, per_output: int = 0, minus_outputs: bool = False) -> Formula:
    """``per_input * n_in + per_output * n_out`` (``- n_out`` for tree reductions: n-1 adds)."""

    def formula(call: OpCall) -> Cost:
        if not call.is_floating():
            return Cost(0)
        source = call.inputs[0]
        n_in, n_out = source.numel(), call.output.numel()
        flops = per_input * n_in + per_output * n_out - (n_out if minus_outputs else 0)
        return Cost(max(flops, 0))

    return formula


_register_many(("sum", "nansum", "prod", "amax", "amin", "max", "min", "argmax", "argmin",
                "aminmax", "any", "all"), _reduction(1, minus_outputs=True))
_register_many(("mean", "nanmean", "cumsum", "cumprod", "logcumsumexp", "histc", "bincount"),
               _reduction(1))
# var: mean (n) + subtract (n) + square (n) + sum (n) ; std adds a square root per output
_register_many(("var", "var_mean"), _reduction(4))
_register_many(("std", "std_mean"), _reduction(4, per_output=1))
_register_many(("norm", "linalg_vector_norm", "frobenius_norm"), _reduction(2, per_output=1))
_register_many(("logsumexp",), _reduction(4, per_output=1))


def _sort(call: OpCall) -> Cost:
    """Comparison sort: n * ceil(log2(length)) compares (n = all elements)."""
    source = call.inputs[0]
    if source.numel() == 0:
        return Cost(0)
    dim = call.arg("dim", -1)
    length = source.shape[dim] if source.dim() else 1
    return Cost(source.numel() * max(1, math.ceil(math.log2(max(length, 2)))))


def _topk(call: OpCall) -> Cost:
    """Heap selection: n * ceil(log2(k + 1)) compares."""
    source = call.inputs[0]
    k = int(call.arg("k", 1))
    return Cost(source.numel() * max(1, math.ceil(math.log2(k + 1))))


_register_many(("sort", "argsort", "msort"), _sort)
_register_many(("topk",), _topk)


# --------------------------------------------------------------------------- softmax & norms
SOFTMAX_FLOPS_PER_ELEMENT = 5  # max, subtract, exp, sum, divide (log-softmax: log instead)


def _softmax(call: OpCall) -> Cost:
    return Cost(SOFTMAX_FLOPS_PER_ELEMENT * call.output.numel())


def _softmax_backward(call: OpCall) -> Cost:
    return Cost(4 * call.output.numel())  # y * (g - sum(g * y)): mul, sum, sub, mul


_register_many(("_softmax", "_log_softmax", "_safe_softmax", "softmax", "log_softmax"),
               _softmax)
_register_many(("_softmax_backward_data", "_log_softmax_backward_data"), _softmax_backward)
# masked softmax: the mask costs one select per element, as a masked score does in attention
_register_many(("_masked_softmax",), _elementwise(SOFTMAX_FLOPS_PER_ELEMENT + 1))

NORM_FLOPS_PER_ELEMENT = 5  # mean, subtract, square, sum (variance), multiply by 1/std


def _layer_norm(call: OpCall) -> Cost:
    """LayerNorm / GroupNorm: 5 per element, +1 each for the weight and the bias."""
    n = call.arg("input").numel()
    affine = (call.arg("weight") is not None) + (call.arg("bias") is not None)
    return Cost((NORM_FLOPS_PER_ELEMENT + affine) * n)


def _rms_norm(call: OpCall) -> Cost:
    """RMSNorm: square, sum, multiply by 1/rms = 3 per element, +1 for the weight."""
    n = call.arg("input").numel()
    return Cost((3 + (call.arg("weight") is not None)) * n)


def _batch_norm(call: OpCall) -> Cost:
    """BatchNorm: normalise (subtract, multiply) = 2 per element, +1 each for weight and bias,
    +4 per element in training for the batch statistics (mean, subtract, square, sum)."""
    n = call.arg("input").numel()
    training = bool(call.arg("training", False))
    if call.func.overloadpacket is aten._native_batch_norm_legit_no_training:
        training = False
    affine = (call.arg("weight") is not None) + (call.arg("bias") is not None)
    return Cost((2 + affine + (4 if training else 0)) * n)


def _norm_backward(call: OpCall) -> Cost:
    """Norm backward: 8 per element for the input gradient, 2 for the weight's, 1 for the bias'."""
    grad = call.inputs[0]
    mask = call.arg("output_mask", [True, True, True])
    per = 8 * bool(mask[0]) + 2 * bool(len(mask) > 1 and mask[1]) + bool(len(mask) > 2 and mask[2])
    return Cost(per * grad.numel())


def _renorm(call: OpCall) -> Cost:
    """renorm(x, p, dim, maxnorm): each slice along ``dim`` is scaled down to norm ``maxnorm``:
    its norm (power + sum = 2 per element, a root and a compare per slice), then a multiply."""
    x = call.arg("self")
    slices = x.shape[int(call.arg("dim"))] if x.dim() else 1
    return Cost(3 * x.numel() + 2 * slices)


_register_many(("renorm",), _renorm)
_register_many(("native_layer_norm", "native_group_norm"), _layer_norm)
_register_many(("_fused_rms_norm",), _rms_norm)
_register_many(("native_batch_norm", "_native_batch_norm_legit",
                "_native_batch_norm_legit_no_training", "_native_batch_norm_legit_functional",
                "cudnn_batch_norm", "miopen_batch_norm"), _batch_norm)
_register_many(("native_layer_norm_backward", "native_group_norm_backward",
                "native_batch_norm_backward", "cudnn_batch_norm_backward",
                "_fused_rms_norm_backward"), _norm_backward)


# --------------------------------------------------------------------------- matmul family
def _mm(call: OpCall) -> Cost:
    a, b = call.inputs[0], call.inputs[1]
    return Cost(macs=a.shape[0] * a.shape[1] * b.shape[-1])


def _addmm(call: OpCall) -> Cost:
    """beta * bias + alpha * (a @ b): 2mnk, + mn for the add, + mn per scale that is not 1."""
    a, b = call.arg("mat1"), call.arg("mat2")
    m, k, n = a.shape[0], a.shape[1], b.shape[1]
    extra = _scaled_add(call, m * n)
    return Cost(2 * m * n * k + extra, macs=m * n * k)


def _scaled_add(call: OpCall, n: int) -> int:
    beta, alpha = call.arg("beta", 1), call.arg("alpha", 1)
    if beta == 0:
        return n * (alpha != 1)
    return n * (1 + (beta != 1) + (alpha != 1))


def _bmm(call: OpCall) -> Cost:
    a, b = call.inputs[0], call.inputs[1]
    return Cost(macs=a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2])


def _baddbmm(call: OpCall) -> Cost:
    a, b = call.arg("batch1"), call.arg("batch2")
    batch, m, k, n = a.shape[0], a.shape[1], a.shape[2], b.shape[2]
    macs = batch * m * n * k
    return Cost(2 * macs + _scaled_add(call, batch * m * n), macs=macs)


def _addbmm(call: OpCall) -> Cost:
    a, b = call.arg("batch1"), call.arg("batch2")
    batch, m, k, n = a.shape[0], a.shape[1], a.shape[2], b.shape[2]
    macs = batch * m * n * k
    return Cost(2 * macs + _scaled_add(call, m * n), macs=macs)


def _mv(call: OpCall) -> Cost:
    a = call.inputs[0]
    return Cost(macs=a.shape[0] * a.shape[1])


def _addmv(call: OpCall) -> Cost:
    a = call.arg("mat")
    return Cost(2 * a.shape[0] * a.shape[1] + _scaled_add(call, a.shape[0]),
                macs=a.shape[0] * a.shape[1])


def _dot(call: OpCall) -> Cost:
    return Cost(macs=call.inputs[0].numel())


def _outer(call: OpCall) -> Cost:
    return Cost(call.output.numel())  # one multiply per element


def _addr(call: OpCall) -> Cost:
    n = call.output.numel()
    return Cost(n + _scaled_add(call, n))


def _grouped_mm(call: OpCall) -> Cost:
    """Grouped GEMM: each row (or column, or K-slice) meets only its own group's matrix."""
    a, b = call.inputs[0], call.inputs[1]
    if a.dim() == 2 and b.dim() == 2:  # K is split into groups: M x N x K_total in all
        macs = a.shape[0] * b.shape[1] * a.shape[1]
    else:
        macs = call.output.numel() * a.shape[-1]
    extra = call.output.numel() if call.arg("bias") is not None else 0
    return Cost(2 * macs + extra, macs=macs)


def _packed_weight_mm(call: OpCall) -> Cost:
    """Weight-only quantized mm (int8 / int4 packed): x (m, k) times the dequantized (k, n)."""
    x = call.inputs[0]
    m, k = x.shape[0] if x.dim() > 1 else 1, x.shape[-1]
    n = call.output.shape[-1]
    return Cost(2 * m * n * k + m * n, macs=m * n * k)  # + the per-channel scale multiply


def _scaled_mm(call: OpCall) -> Cost:
    a, b = call.inputs[0], call.inputs[1]
    return Cost(macs=a.shape[0] * a.shape[1] * b.shape[1])


_register_many(("mm", "_int_mm"), _mm)
def _addmm_activation(call: OpCall) -> Cost:
    """addmm followed by a fused ReLU (1 per output element) or GELU (5)."""
    cost = _addmm(call)
    per = 5 if call.arg("use_gelu", False) else 1
    return Cost(cost.flops + per * call.output.numel(), macs=cost.macs)


_register_many(("addmm",), _addmm)
_register_many(("_addmm_activation",), _addmm_activation)
_register_many(("bmm",), _bmm)
_register_many(("baddbmm",), _baddbmm)
_register_many(("addbmm",), _addbmm)
_register_many(("mv",), _mv)
_register_many(("addmv",), _addmv)
_register_many(("dot", "vdot"), _dot)
_register_many(("outer", "ger"), _outer)
_register_many(("addr",), _addr)
_register_many(("_grouped_mm", "_scaled_grouped_mm"), _grouped_mm)
_register_many(("_weight_int8pack_mm", "_weight_int4pack_mm", "_weight_int4pack_mm_for_cpu",
                "_weight_int4pack_mm_with_scales_and_zeros", "_dyn_quant_matmul_4bit"),
               _packed_weight_mm)
_register_many(("_scaled_mm",), _scaled_mm)


# --------------------------------------------------------------------------- convolution
def conv_macs(
    input_shape: Sequence[int],
    weight_shape: Sequence[int],
    output_shape: Sequence[int],
    transposed: bool = False,
) -> int:
    """MACs of a (possibly grouped, dilated, strided or transposed) convolution.

    Direct: every output element is a dot product of ``C_in / groups * prod(kernel)`` terms.
    Transposed: every *input* element is scattered through ``C_out / groups * prod(kernel)``
    weights. Padding and dilation change which positions exist, not the per-position work.
    """
    kernel = _prod(weight_shape[2:])
    if transposed:  # weight: (C_in, C_out / groups, *kernel)
        return _prod(input_shape) * weight_shape[1] * kernel
    return _prod(output_shape) * weight_shape[1] * kernel  # weight: (C_out, C_in / groups, *k)


def _convolution(call: OpCall) -> Cost:
    x, w = call.arg("input"), call.arg("weight")
    out = call.output
    macs = conv_macs(x.shape, w.shape, out.shape, bool(call.arg("transposed", False)))
    bias = out.numel() if call.arg("bias") is not None else 0
    return Cost(2 * macs + bias, macs=macs)


def _convolution_backward(call: OpCall) -> Cost:
    """Input gradient and weight gradient each cost the forward's MACs; bias grad sums grad."""
    grad, x, w = call.arg("grad_output"), call.arg("input"), call.arg("weight")
    mask = call.arg("output_mask", [True, True, True])
    forward = conv_macs(x.shape, w.shape, grad.shape, bool(call.arg("transposed", False)))
    macs = forward * (bool(mask[0]) + bool(mask[1]))
    return Cost(2 * macs + (grad.numel() if mask[2] else 0), macs=macs)


_register_many(("convolution", "_convolution", "convolution_overrideable", "cudnn_convolution",
                "mkldnn_convolution", "_slow_conv2d_forward", "thnn_conv2d",
                "_convolution_mode", "conv_depthwise2d", "_conv_depthwise2d",
                "slow_conv_dilated2d", "slow_conv_transpose2d"), _convolution)
_register_many(("convolution_backward", "convolution_backward_overrideable"),
               _convolution_backward)


# --------------------------------------------------------------------------- attention
def attention_pairs(q_len: int, k_len: int, causal: bool, bottom_right: bool = False) -> int:
    """(query, key) pairs attention computes per head: all of them, or those a causal mask keeps.

    The causal mask is torch's top-left aligned one (``ones(L, S).tril()``): query i sees keys
    0..i, so a square mask keeps n(n+1)/2 pairs, not n^2 / 2 and not n^2. ``bottom_right``
    aligns the diagonal with the last key instead (query i sees keys 0..i + S - L), as the
    efficient-attention kernel's ``custom_mask_type=2`` does.
    """
    if not causal:
        return q_len * k_len
    # sum over queries i of clamp(first + i, 0, k_len): the keys query i may see
    first = 1 + (k_len - q_len if bottom_right else 0)
    start = min(max(-first, 0), q_len)  # queries before this see nothing
    full = min(max(k_len - first, start), q_len)  # queries from here on see every key
    ramp = (full - start) * first + (start + full - 1) * (full - start) // 2
    return ramp + (q_len - full) * k_len


# per kept score: scale (1) + softmax (5); a mask adds 1, dropout adds 1
ATTENTION_SCORE_FLOPS = 1 + SOFTMAX_FLOPS_PER_ELEMENT
# backward per kept score: recompute P (scale, subtract logsumexp, exp = 3), dS = P(dP - D) (2),
# scale dS (1)
ATTENTION_BACKWARD_SCORE_FLOPS = 6


def attention_cost(
    batch: int,
    q_heads: int,
    kv_heads: int,
    q_len: int,
    k_len: int,
    head_dim: int,
    value_dim: int,
    causal: bool = False,
    masked: bool = False,
    dropout: bool = False,
    backward: bool = False,
    bottom_right: bool = False,
) -> Cost:
    """Cost of fused scaled-dot-product attention (inputs laid out as (B, H, S, D)).

    Forward MACs: ``B * H_q * pairs * (d + d_v)`` (QK^T, then PV). Backward recomputes the scores
    from the saved logsumexp: ``B * H_q * pairs * (3d + 2d_v)`` MACs (S, dV, dP, dQ, dK), plus the
    ``D = rowsum(dO * O)`` term and, for grouped KV heads, summing the group's dK/dV.
    """
    pairs = batch * q_heads * attention_pairs(q_len, k_len, causal, bottom_right)
    per_score = (ATTENTION_BACKWARD_SCORE_FLOPS if backward else ATTENTION_SCORE_FLOPS)
    per_score += int(masked) + int(dropout)
    if not backward:
        macs = pairs * (head_dim + value_dim)
        return Cost(2 * macs + per_score * pairs, macs=macs)
    macs = pairs * (3 * head_dim + 2 * value_dim)
    rowsum = 2 * batch * q_heads * q_len * value_dim
    group_sum = batch * (q_heads - kv_heads) * k_len * (head_dim + value_dim)
    return Cost(2 * macs + per_score * pairs + rowsum + group_sum, macs=macs)


def _sdpa(backward: bool, layout: str = "bhsd") -> Formula:
    """Fused attention. ``bhsd`` ops take (batch, heads, seq, dim); ``bshd`` ops
    (``_flash_attention_*``, ``_efficient_attention_*``) take (batch, seq, heads, dim), or a packed
    variable-length batch (total, heads, dim) with cumulative sequence offsets."""

    def formula(call: OpCall) -> Cost:
        q, k, v = call.arg("query"), call.arg("key"), call.arg("value")
        mask = next((m for m in (call.arg("attn_mask"), call.arg("attn_bias"), call.arg("bias"))
                     if m is not None), None)
        mask_type = call.arg("custom_mask_type", 0)
        causal = bool(call.arg("is_causal", False)) or mask_type in (1, 2)
        options = {"causal": causal, "bottom_right": mask_type == 2, "masked": mask is not None,
                   "dropout": float(call.arg("dropout_p", 0.0)) > 0, "backward": backward}
        if layout == "bshd":
            cum_q = call.arg("cum_seq_q", call.arg("cu_seqlens_q"))
            cum_k = call.arg("cum_seq_k", call.arg("cu_seqlens_k"))
            heads, kv_heads = q.shape[-2], k.shape[-2]
            d, dv = q.shape[-1], v.shape[-1]
            if cum_q is not None and cum_k is not None:  # packed: one sequence per offset pair
                q_lens = (cum_q[1:] - cum_q[:-1]).tolist()
                k_lens = (cum_k[1:] - cum_k[:-1]).tolist()
                parts = [attention_cost(1, heads, kv_heads, int(lq), int(lk), d, dv, **options)
                         for lq, lk in zip(q_lens, k_lens, strict=True)]
                return Cost(sum(p.flops for p in parts), sum(p.macs for p in parts))
            return attention_cost(q.shape[0], heads, kv_heads, q.shape[1], k.shape[1], d, dv,
                                  **options)
        return attention_cost(q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2],
                              q.shape[3], v.shape[3], **options)

    return formula


_register_many(("_scaled_dot_product_flash_attention_for_cpu",
                "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                "_scaled_dot_product_cudnn_attention",
                "_scaled_dot_product_fused_attention_overrideable"), _sdpa(backward=False))
_register_many(("_scaled_dot_product_flash_attention_for_cpu_backward",
                "_scaled_dot_product_flash_attention_backward",
                "_scaled_dot_product_efficient_attention_backward",
                "_scaled_dot_product_cudnn_attention_backward",
                "_scaled_dot_product_fused_attention_overrideable_backward"),
               _sdpa(backward=True))
_register_many(("_flash_attention_forward", "_efficient_attention_forward"),
               _sdpa(backward=False, layout="bshd"))
_register_many(("_flash_attention_backward", "_efficient_attention_backward"),
               _sdpa(backward=True, layout="bshd"))


# --------------------------------------------------------------------------- fused modules
def multi_head_attention_cost(
    batch: int,
    q_len: int,
    k_len: int,
    embed_dim: int,
    num_heads: int,
    masked: bool = False,
    need_weights: bool = False,
    average_weights: bool = True,
) -> Cost:
    """Cost of ``aten._native_multi_head_attention``: nn.MultiheadAttention's inference fast path,
    one kernel that runs the in-projection, attention and out-projection unfused.

    query (B, T, D), key and value (B, S, D) (torch's kernel requires S = T; the formula keeps
    them apart); H heads of size d = D / H. The kernel computes:

    * in-projection: q (B*T x D x D), k and v (B*S x D x D each) MACs, + 1 bias add per element
      of q, k and v, + 1 multiply per element of q (the 1/sqrt(d) scale is applied to q);
    * scores QK^T and context PV: B*H*T*S*d MACs each; softmax 5 per score, + 1 with a mask;
    * out-projection: B*T x D x D MACs, + 1 bias add per output element;
    * with ``need_weights`` and ``average_weights``: the mean over heads, 1 per score.

    This equals what the same module costs on its decomposed path with ``need_weights=True``
    (linear, scale, bmm, softmax, bmm, linear, mean).
    """
    d = embed_dim // num_heads
    scores = batch * num_heads * q_len * k_len
    q_rows, k_rows = batch * q_len, batch * k_len
    projection = (2 * q_rows + 2 * k_rows) * embed_dim * embed_dim
    macs = projection + 2 * scores * d
    # q: bias and scale, k and v: bias, output: bias
    other = (3 * q_rows + 2 * k_rows) * embed_dim
    other += (SOFTMAX_FLOPS_PER_ELEMENT + int(masked)) * scores
    if need_weights and average_weights:
        other += scores  # sum over heads ((H - 1) adds per (b, t, s)), then one divide
    return Cost(2 * macs + other, macs=macs)


def _native_multi_head_attention(call: OpCall) -> Cost:
    # The CPU kernel always takes the unfused path counted here. (The CUDA kernel may call fused
    # SDPA for self-attention without a mask or weights: the same MACs, its scale per score.)
    query, key = call.arg("query"), call.arg("key")
    embed_dim, heads = int(call.arg("embed_dim")), int(call.arg("num_head"))
    if query.dim() != 3 or key.dim() != 3:
        raise LeanError(f"_native_multi_head_attention: expected (batch, seq, embed_dim) query "
                        f"and key, got {tuple(query.shape)} and {tuple(key.shape)}")
    return multi_head_attention_cost(
        query.shape[0], query.shape[1], key.shape[1], embed_dim, heads,
        masked=call.arg("mask") is not None,
        need_weights=bool(call.arg("need_weights", True)),
        average_weights=bool(call.arg("average_attn_weights", True)),
    )


_register_many(("_native_multi_head_attention",), _native_multi_head_attention)

# Recurrent cells: FLOPs per hidden unit per (time step, sequence) besides the matmuls, without
# biases. One bias add per gate row per bias vector (b_ih and b_hh) comes on top: 2 * gates.
# Forward, LSTM: the two gate matmuls are summed (4 adds), 3 sigmoids (3 each), tanh of the cell
# gate and of the new cell (1 each), c' = f*c + i*g (2 multiplies, 1 add), h' = o*tanh(c')
# (1 multiply): 4 + 9 + 2 + 4 = 19. This is what the decomposed cell (RNN.cpp's LSTMCell, run
# when oneDNN is off) costs op by op, so both paths count the same.
LSTM_FORWARD_FLOPS_PER_UNIT = 19
# Backward, LSTM: dh = output grad + recurrent grad (1); through h' = o*tanh(c'): do, dtanh (2),
# tanh backward (3), dc += (1); through c' = f*c + i*g: di, dg, df, dc_prev (4); the gates'
# activation backwards: 3 sigmoid + 1 tanh at 3 each (12). 1 + 6 + 4 + 12 = 23. Bias gradients
# add one accumulate per gate row per bias vector, as in forward.
LSTM_BACKWARD_FLOPS_PER_UNIT = 23
LSTM_GATES = 4


def lstm_layer_cost(
    tokens: int,
    input_size: int,
    hidden_size: int,
    has_biases: bool = True,
    backward: bool = False,
) -> Cost:
    """Cost of one LSTM layer in one direction over ``tokens`` (time steps x sequences).

    Per token: the input matmul (4H x I) and the hidden matmul (4H x H) MACs, plus
    ``LSTM_FORWARD_FLOPS_PER_UNIT`` per hidden unit (+8 with biases). Backward computes the input,
    hidden-state and both weight gradients: twice the forward MACs, plus
    ``LSTM_BACKWARD_FLOPS_PER_UNIT`` per hidden unit (+8 with biases).
    """
    macs = tokens * LSTM_GATES * hidden_size * (input_size + hidden_size)
    per_unit = LSTM_BACKWARD_FLOPS_PER_UNIT if backward else LSTM_FORWARD_FLOPS_PER_UNIT
    per_unit += 2 * LSTM_GATES * int(has_biases)
    if backward:
        macs *= 2
    return Cost(2 * macs + per_unit * tokens * hidden_size, macs=macs)


def _mkldnn_lstm_layer(backward: bool) -> Formula:
    """oneDNN's LSTM layer (``aten.mkldnn_rnn_layer`` and its backward): torch's CPU LSTM for
    float32 / bfloat16 inputs without ``proj_size`` or packed sequences, one call per layer and
    direction, in eval and in training alike. The input is (T, B, I) or packed (sum of batch
    sizes, I): either way ``numel / I`` tokens go through the cell."""
    first_weight = "weight1" if backward else "weight0"

    def formula(call: OpCall) -> Cost:
        x, w_ih = call.arg("input"), call.arg(first_weight)
        hidden = int(call.arg("hidden_size"))
        if w_ih.shape[0] != LSTM_GATES * hidden:
            raise LeanError(
                f"{call.name}: expected an LSTM input weight of {LSTM_GATES} * hidden_size = "
                f"{LSTM_GATES * hidden} rows, got {tuple(w_ih.shape)} (oneDNN's RNN layer in "
                "torch runs LSTMs only)"
            )
        input_size = w_ih.shape[1]
        tokens = x.numel() // input_size if input_size else 0
        return lstm_layer_cost(tokens, input_size, hidden, bool(call.arg("has_biases", True)),
                               backward=backward)

    return formula


_register_many(("mkldnn_rnn_layer",), _mkldnn_lstm_layer(backward=False))
_register_many(("mkldnn_rnn_layer_backward",), _mkldnn_lstm_layer(backward=True))


# --------------------------------------------------------------------------- lookups & pooling
def _gather_rows(call: OpCall) -> Cost:
    """Embedding / index_select / gather: reads the indices and only the selected elements."""
    out = call.output
    indices = [t for t in call.inputs if not (t.is_floating_point() or t.is_complex())]
    read = sum(tensor_bytes(t) for t in indices) + tensor_bytes(out)
    return Cost(0, bytes_read=read, bytes_written=tensor_bytes(out))


def _scatter_add(call: OpCall) -> Cost:
    """Accumulating scatters: one add per source element."""
    source = call.arg("src", call.arg("source", call.arg("values", call.arg("grad_output"))))
    if source is None or not call.is_floating():
        return Cost(0)
    return Cost(source.numel())


def _index_put(call: OpCall) -> Cost:
    values = call.arg("values")
    accumulate = bool(call.arg("accumulate", False))
    return Cost(values.numel() if accumulate and call.is_floating() else 0)


def _put(call: OpCall) -> Cost:
    """put_(self, index, source, accumulate): writes (or adds) one element per source element."""
    source = call.arg("source")
    adds = source.numel() if bool(call.arg("accumulate", False)) and call.is_floating() else 0
    moved = tensor_bytes(source) + tensor_bytes(call.arg("index"))
    return Cost(adds, bytes_read=moved, bytes_written=tensor_bytes(source))


def _embedding_renorm(call: OpCall) -> Cost:
    """embedding_renorm_(weight, indices, max_norm, norm_type): renormalises only the rows that
    ``indices`` looks up (each once): a norm (2 per element + a root), a compare, a scale."""
    weight, indices = call.arg("self"), call.arg("indices")
    rows = int(torch.unique(indices).numel())
    row_elements = rows * (weight.numel() // max(weight.shape[0], 1))
    row_bytes = row_elements * weight.element_size()
    return Cost(3 * row_elements + 2 * rows, bytes_read=tensor_bytes(indices) + row_bytes,
                bytes_written=row_bytes)


def _max_pool(call: OpCall) -> Cost:
    kernel = call.arg("kernel_size", [1])
    return Cost(call.output.numel() * max(_prod(kernel) - 1, 0))


def _avg_pool(call: OpCall) -> Cost:
    kernel = call.arg("kernel_size", [1])
    return Cost(call.output.numel() * _prod(kernel))  # k - 1 adds and one divide


def _adaptive_avg_pool(call: OpCall) -> Cost:
    return Cost(call.inputs[0].numel() + call.output.numel())  # sums, then one divide each


def _pool_backward(call: OpCall) -> Cost:
    return Cost(call.inputs[0].numel())  # route/accumulate each output gradient


def _interpolate(per_output: int) -> Formula:
    def formula(call: OpCall) -> Cost:
        return Cost(per_output * call.output.numel())

    return formula


_register_many(("embedding", "index_select", "gather", "index", "_unsafe_index",
                "take", "take_along_dim", "masked_select"), _gather_rows)
_register_many(("embedding_dense_backward", "scatter_add", "index_add", "scatter_reduce",
                "_embedding_bag", "embedding_bag", "index_reduce"), _scatter_add)
_register_many(("index_put", "_index_put_impl", "_unsafe_index_put"), _index_put)
_register_many(("put",), _put)
_register_many(("embedding_renorm",), _embedding_renorm)
_register_many(("max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices",
                "max_pool3d_with_indices", "_max_pool2d", "mkldnn_max_pool2d"), _max_pool)
_register_many(("avg_pool1d", "avg_pool2d", "avg_pool3d"), _avg_pool)
_register_many(("_adaptive_avg_pool2d", "_adaptive_avg_pool3d", "adaptive_avg_pool1d",
                "adaptive_max_pool2d", "adaptive_max_pool1d", "adaptive_max_pool3d"),
               _adaptive_avg_pool)
_register_many(("max_pool2d_with_indices_backward", "max_pool3d_with_indices_backward",
                "avg_pool2d_backward", "avg_pool3d_backward", "_adaptive_avg_pool2d_backward",
                "_adaptive_avg_pool3d_backward", "adaptive_max_pool2d_backward"),
               _pool_backward)
_register_many(("upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d",
                "_upsample_nearest_exact1d", "_upsample_nearest_exact2d",
                "_upsample_nearest_exact3d"), _interpolate(0))
_register_many(("upsample_linear1d",), _interpolate(3))  # 2 multiplies + 1 add
_register_many(("upsample_bilinear2d", "_upsample_bilinear2d_aa"), _interpolate(7))
_register_many(("upsample_trilinear3d",), _interpolate(15))
_register_many(("upsample_bicubic2d", "_upsample_bicubic2d_aa"), _interpolate(31))


def _nll_loss(call: OpCall) -> Cost:
    return Cost(call.arg("target").numel())  # pick and sum one log-probability per target


_register_many(("nll_loss_forward", "nll_loss2d_forward"), _nll_loss)
_register_many(("nll_loss_backward", "nll_loss2d_backward"), _elementwise(0))
_register_many(("mse_loss",), _reduction(3))
_register_many(("mse_loss_backward",), _elementwise(3))


# --------------------------------------------------------------------------- data movement
_register_many((
    "_to_copy", "copy", "clone", "cat", "stack", "hstack", "vstack", "constant_pad_nd",
    "reflection_pad1d", "reflection_pad2d", "reflection_pad3d", "replication_pad1d",
    "replication_pad2d", "replication_pad3d", "repeat", "repeat_interleave", "roll", "flip",
    "tril", "triu", "fill", "zero", "zeros", "zeros_like", "ones", "ones_like", "full",
    "full_like", "new_zeros", "new_ones", "new_full", "scalar_tensor", "arange", "linspace",
    "logspace", "eye", "lift_fresh_copy", "scatter", "index_copy", "index_fill", "masked_scatter",
    "nonzero", "nonzero_static", "one_hot", "pixel_shuffle", "pixel_unshuffle", "im2col",
    "col2im", "unfold_backward", "slice_scatter", "select_scatter", "diagonal_scatter",
    "as_strided_scatter", "diag_embed", "expand_copy", "permute_copy", "view_copy",
    "transpose_copy", "t_copy", "unsqueeze_copy", "squeeze_copy", "_unique2",
    "unique_consecutive", "unique_dim", "searchsorted", "bucketize", "rand", "randn", "randint",
    "randperm", "rand_like", "randn_like", "randint_like", "normal", "uniform", "random",
    "exponential", "multinomial", "alias_copy", "detach_copy", "contiguous", "_pin_memory",
    "masked_fill_backward", "_assert_tensor_metadata", "resize_as", "_reshape_copy",
    "native_channel_shuffle", "channel_shuffle", "select_backward", "slice_backward",
    "diagonal_backward", "index_select_backward", "as_strided_backward", "unsqueeze_backward",
    "cauchy", "geometric", "log_normal", "_philox_normal", "_philox_uniform",
    "_fill_mem_eff_dropout_mask",
), _data_movement)
_register_many(("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
                "empty_permuted", "resize", "_resize_output"), _allocation)
# Views and metadata: the output is the input's memory; nothing is computed or moved.
_register_many(("_unsafe_view", "_reshape_alias", "lift_fresh", "lift", "detach", "alias",
                "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "_assert_async",
                "_functional_assert_async", "set", "record_stream", "_nested_tensor_size",
                "_has_compatible_shallow_copy_type", "is_same_size", "_version"), _no_work)
# In-place views change a tensor's sizes and strides, not its data; their schema marks the
# argument written (Tensor(a!)), so `is_view` cannot see them. The `unsafe_` splits return views
# whose schema hides the alias (autograd does not track them as views). Nothing moves.
_register_many(("transpose_", "t_", "as_strided_", "unsqueeze_", "squeeze_", "unsafe_split",
                "unsafe_split_with_sizes"), _no_work)


def _item(call: OpCall) -> Cost:
    source = call.inputs[0]
    return Cost(0, bytes_read=source.element_size(), bytes_written=0)


_register_many(("_local_scalar_dense", "item", "is_nonzero", "equal"), _item)


def is_view(func: Any) -> bool:
    """True when ``func``'s schema says it returns an alias of an input that it does not write:
    a pure view (view, transpose, expand, slice, split, ...), which costs nothing."""
    schema = getattr(func, "_schema", None)
    if schema is None or not getattr(func, "is_view", False):
        return False
    return not any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)
