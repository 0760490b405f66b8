"""The modules quantization transforms leave in a model. Each one replaces an ``nn.Linear``,
takes ``(..., in_features)`` and returns ``(..., out_features)``, is registered with
:mod:`leantorch.serialize` (``spec()`` holds its constructor arguments) and has a
``forward_reference`` that runs the readable dequantize-then-matmul path of
:mod:`leantorch.ops.quant.naive`.

Storage: the quantized weight codes are ``nn.Parameter``s with ``requires_grad=False`` (so a
model keeps its parameter count; an int4 or ternary parameter counts its packed bytes), scales
and offsets are buffers, the bias stays a float parameter. All of them are in the state dict.

Backward: the real modules are for inference, but a float parameter around them (a bias, a
LayerNorm) may still be fine-tuned; their gradient with respect to the input is the straight-
through one, ``grad @ W_hat`` (activation rounding treated as the identity).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from leantorch.errors import LeanError, describe
from leantorch.ops.quant import naive
from leantorch.ops.quant.fake import (
    fake_quantize_groupwise,
    fake_quantize_per_token,
    fake_quantize_ternary,
)
from leantorch.ops.quant.int8 import int8_dynamic_linear, int8_matmul, llm_int8_linear
from leantorch.ops.quant.int8 import quantize_per_token_fast as _quantize_tokens
from leantorch.ops.quant.weight_only import (
    dequantize_int4,
    dequantize_int8,
    dequantize_ternary_packed,
    ternary_codes,
    weight_only_linear,
)
from leantorch.serialize import register_module

__all__ = [
    "SCHEMES",
    "FakeQuantLinear",
    "Int8DynamicLinear",
    "LLMInt8Linear",
    "TernaryLinear",
    "WeightOnlyLinear",
]

SCHEMES = ("int8_dynamic", "int8_weight", "int4_weight", "ternary")


def _frozen(t: Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


def _bias_parameter(out_features: int, bias: bool) -> nn.Parameter | None:
    return nn.Parameter(torch.empty(out_features)) if bias else None


def _copy_bias(module: nn.Module, linear: nn.Linear) -> None:
    if linear.bias is not None:
        module.bias = nn.Parameter(linear.bias.detach().clone(),
                                   requires_grad=linear.bias.requires_grad)


class _QuantizedLinearFunction(torch.autograd.Function):
    """Forward: the quantized module's output. Backward: straight-through gradients of
    ``x_hat @ W_hat.T + b`` for x (rounding of x treated as identity) and the bias."""

    @staticmethod
    def forward(ctx, x: Tensor, bias: Tensor | None, module: _QuantizedLinear) -> Tensor:
        ctx.module = module
        ctx.x_shape = x.shape
        ctx.x_dtype = x.dtype
        return module._compute(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        module = ctx.module
        grad2 = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            w_hat = module.dequantized_weight().to(grad.dtype)
            grad_x = (grad2 @ w_hat).reshape(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            grad_bias = grad2.sum(0).to(module.bias.dtype)
        return grad_x, grad_bias, None


class _QuantizedLinear(nn.Module):
    """Shared plumbing: sizes, the bias, and the autograd wrapper."""

    in_features: int
    out_features: int
    bias: nn.Parameter | None

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise LeanError(f"{type(self).__name__}: input has {x.shape[-1]} features in its "
                            f"last dim (shape {tuple(x.shape)}), expected {self.in_features}")
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or (self.bias is not None and self.bias.requires_grad))
        if needs_grad:
            return _QuantizedLinearFunction.apply(x, self.bias, self)
        return self._compute(x)

    def _compute(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def dequantized_weight(self) -> Tensor:
        """The (out, in) float32 weight the stored codes represent."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


# --------------------------------------------------------------------------- int8 dynamic
@register_module(name="leantorch.Int8DynamicLinear")
class Int8DynamicLinear(_QuantizedLinear):
    """int8 weights (per output channel, symmetric) times int8 activations (per token,
    symmetric, scales from the current batch), accumulated in int32 (``torch._int_mm``) and
    rescaled: ``y = (q_x @ q_w.T) * s_x * s_w + b``.

    weight: (out, in) int8; weight_scale: (out,) float32; bias: (out,) or None. The output
    has the input's dtype (a bfloat16 input runs the bfloat16 path of
    :func:`~leantorch.ops.quant.int8.int8_dynamic_linear`). ``share_quantization``: reuse the
    quantized input of the previous int8 layer when it read the same unchanged tensor (q, k
    and v projections); bit-identical to quantizing again. ``compile_quantization``: quantize
    through ``torch.compile`` (fused loops, bit-identical; the first call compiles).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 share_quantization: bool = False, compile_quantization: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.share_quantization = bool(share_quantization)
        self.compile_quantization = bool(compile_quantization)
        self.weight = _frozen(torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32))
        self.register_parameter("bias", _bias_parameter(out_features, bias))

    def spec(self) -> dict[str, Any]:
        """Constructor arguments for :func:`leantorch.serialize.build`: ``in_features``,
        ``out_features``, ``bias`` (bool), ``share_quantization``, ``compile_quantization``."""
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "share_quantization": self.share_quantization,
                "compile_quantization": self.compile_quantization}

    @classmethod
    def from_linear(cls, linear: nn.Linear, share_quantization: bool = False,
                    compile_quantization: bool = False) -> Int8DynamicLinear:
        """Quantize ``linear``'s (out, in) weight to int8 codes with one float32 scale per output
        row (symmetric); the bias is copied. The module lands on the weight's device."""
        weight = linear.weight.detach()
        module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                     share_quantization=share_quantization,
                     compile_quantization=compile_quantization)
        codes, scale, _ = naive.quantize_groupwise(weight, 8, linear.in_features)
        module.weight = _frozen(codes.to(weight.device))
        module.weight_scale = scale.squeeze(1).to(weight.device)
        _copy_bias(module, linear)
        return module

    def _compute(self, x: Tensor) -> Tensor:
        return int8_dynamic_linear(x, self.weight, self.weight_scale, self.bias,
                                   share_quantization=self.share_quantization,
                                   compiled=self.compile_quantization)

    def forward_reference(self, x: Tensor) -> Tensor:
        """The same product computed naively (both sides dequantized, float64 matmul), for tests:
        ``x (..., in_features)`` -> ``(..., out_features)`` in ``x``'s dtype."""
        return naive.int8_dynamic_linear_reference(x, self.weight, self.weight_scale, self.bias)

    def dequantized_weight(self) -> Tensor:
        return self.weight.float() * self.weight_scale.unsqueeze(1)


# --------------------------------------------------------------------------- LLM.int8()
@register_module(name="leantorch.LLMInt8Linear")
class LLMInt8Linear(Int8DynamicLinear):
    """LLM.int8(): like :class:`Int8DynamicLinear`, except that input features whose
    magnitude exceeds ``threshold`` anywhere in the current batch stay in floating point and
    multiply the matching (dequantized) weight columns in float.

    Statistics since construction (or :meth:`reset_statistics`), kept out of the state dict:
    ``calls``, ``columns_seen``, ``outlier_columns_seen`` and ``int8_fraction`` (the fraction of
    input features, hence of the layer's MACs, computed in 8 bits).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 threshold: float = 6.0) -> None:
        super().__init__(in_features, out_features, bias)
        self.threshold = float(threshold)
        self.reset_statistics()

    def spec(self) -> dict[str, Any]:
        """Constructor arguments: ``in_features``, ``out_features``, ``bias`` (bool) and the
        outlier ``threshold``."""
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "threshold": self.threshold}

    @classmethod
    def from_linear(cls, linear: nn.Linear, threshold: float = 6.0) -> LLMInt8Linear:
        """Quantize ``linear`` as :meth:`Int8DynamicLinear.from_linear` does (int8 rows, one scale
        each) and keep input features above ``threshold`` in float at run time."""
        base = Int8DynamicLinear.from_linear(linear)
        module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                     threshold=threshold)
        module.weight, module.weight_scale, module.bias = base.weight, base.weight_scale, base.bias
        return module

    def reset_statistics(self) -> None:
        """Zero ``calls``, ``columns_seen`` and ``outlier_columns_seen`` (``int8_fraction`` is
        None again until the next call)."""
        self.calls = 0
        self.columns_seen = 0
        self.outlier_columns_seen = 0

    @property
    def int8_fraction(self) -> float | None:
        """Fraction of input features multiplied in int8 over the calls seen (None before
        the first call)."""
        if not self.columns_seen:
            return None
        return 1.0 - self.outlier_columns_seen / self.columns_seen

    def _compute(self, x: Tensor) -> Tensor:
        out, outliers = llm_int8_linear(x, self.weight, self.weight_scale, self.bias,
                                        self.threshold)
        self.calls += 1
        self.columns_seen += self.in_features
        self.outlier_columns_seen += outliers
        return out

    def forward_reference(self, x: Tensor) -> Tensor:
        """The naive LLM.int8() product (outlier columns in float, the rest dequantized int8),
        without touching the statistics: ``x (..., in_features)`` -> ``(..., out_features)``."""
        out, _ = naive.llm_int8_linear_reference(x, self.weight, self.weight_scale, self.bias,
                                                 self.threshold)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, threshold={self.threshold}"


# --------------------------------------------------------------------------- weight-only
@register_module(name="leantorch.WeightOnlyLinear")
class WeightOnlyLinear(_QuantizedLinear):
    """Weight-only quantized Linear: float activations times a weight dequantized on the fly
    (no cached float copy) from ``bits``-bit codes with one scale (and, when asymmetric, one
    float offset) per ``group_size`` input features of each output row.

    weight: (out, in) int8 (8-bit symmetric), uint8 (8-bit asymmetric) or (out, in // 2) uint8
    (4-bit, two codes per byte); weight_scale: (out, in // group_size) float32; weight_offset:
    same, asymmetric only.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 8,
                 group_size: int | None = None, symmetric: bool = True) -> None:
        super().__init__()
        group_size = in_features if group_size is None else group_size
        check_group_size(in_features, bits, group_size)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        groups = in_features // group_size
        if bits == 4:
            storage = torch.empty(out_features, in_features // 2, dtype=torch.uint8)
        else:
            storage = torch.empty(out_features, in_features,
                                  dtype=torch.int8 if symmetric else torch.uint8)
        self.weight = _frozen(storage)
        self.register_buffer("weight_scale", torch.empty(out_features, groups))
        self.register_buffer("weight_offset",
                             None if symmetric else torch.empty(out_features, groups))
        self.register_parameter("bias", _bias_parameter(out_features, bias))

    def spec(self) -> dict[str, Any]:
        """Constructor arguments: ``in_features``, ``out_features``, ``bias`` (bool), ``bits``
        (8 or 4), ``group_size`` (input features per scale) and ``symmetric``."""
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "bits": self.bits,
                "group_size": self.group_size, "symmetric": self.symmetric}

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int | None = None,
                    symmetric: bool = True) -> WeightOnlyLinear:
        """Quantize ``linear``'s (out, in) weight to ``bits``-bit codes, one scale (and offset when
        asymmetric) per ``group_size`` inputs of a row (None: the whole row); 4-bit codes are
        packed two per byte. The bias is copied."""
        weight = linear.weight.detach()
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, bits,
                     group_size, symmetric)
        codes, scale, offset = naive.quantize_groupwise(weight, bits, module.group_size,
                                                        symmetric)
        if bits == 4:
            codes = naive.pack_int4(codes, symmetric)
        module.weight = _frozen(codes.to(weight.device))
        module.weight_scale = scale.to(weight.device)
        if offset is not None:
            module.weight_offset = offset.to(weight.device)
        _copy_bias(module, linear)
        return module

    def codes(self) -> Tensor:
        """The unpacked (out, in) integer codes."""
        if self.bits == 4:
            return naive.unpack_int4(self.weight, self.symmetric)
        return self.weight

    def dequantized_weight(self) -> Tensor:
        if self.bits == 4:
            return dequantize_int4(self.weight, self.weight_scale, self.weight_offset)
        return dequantize_int8(self.weight, self.weight_scale, self.weight_offset)

    def forward(self, x: Tensor) -> Tensor:  # F.linear is differentiable as it is
        """``x (..., in_features)`` -> ``(..., out_features)``: ``x @ W_hat.T + bias`` with the weight
        dequantized to ``x``'s dtype for this call only."""
        if x.shape[-1] != self.in_features:
            raise LeanError(f"WeightOnlyLinear: input has {x.shape[-1]} features in its last "
                            f"dim (shape {tuple(x.shape)}), expected {self.in_features}")
        return weight_only_linear(x, self.dequantized_weight(), self.bias)

    def forward_reference(self, x: Tensor) -> Tensor:
        """The same product from the unpacked codes through the naive dequantizer, for tests:
        ``x (..., in_features)`` -> ``(..., out_features)``."""
        w_hat = naive.dequantize_groupwise(self.codes(), self.weight_scale, self.weight_offset)
        return naive.weight_only_linear_reference(x, w_hat, self.bias)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, bits={self.bits}, group_size={self.group_size}, "
                f"symmetric={self.symmetric}")


# --------------------------------------------------------------------------- ternary
@register_module(name="leantorch.TernaryLinear")
class TernaryLinear(_QuantizedLinear):
    """BitNet b1.58-style Linear: weights in {-1, 0, 1} times one absmean scale ``gamma``,
    packed four per byte. With ``activation_bits=8`` (BitNet's choice) activations are
    quantized per token and the product runs as int8 x int8 -> int32; with None, activations
    stay float and the weight is dequantized.

    weight: (out, ceil(in / 4)) uint8; weight_scale: (1,) float32 (gamma).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 activation_bits: int | None = 8) -> None:
        super().__init__()
        check_activation_bits(activation_bits)
        self.in_features, self.out_features = in_features, out_features
        self.activation_bits = activation_bits
        self.weight = _frozen(torch.empty(out_features, -(-in_features // 4),
                                          dtype=torch.uint8))
        self.register_buffer("weight_scale", torch.empty(1))
        self.register_parameter("bias", _bias_parameter(out_features, bias))

    def spec(self) -> dict[str, Any]:
        """Constructor arguments: ``in_features``, ``out_features``, ``bias`` (bool) and
        ``activation_bits`` (8 or None)."""
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "activation_bits": self.activation_bits}

    @classmethod
    def from_linear(cls, linear: nn.Linear, activation_bits: int | None = 8) -> TernaryLinear:
        """Round ``linear``'s weight to {-1, 0, 1} times its absmean ``gamma`` (BitNet b1.58) and pack
        the codes four per byte; the bias is copied."""
        weight = linear.weight.detach()
        module = cls(linear.in_features, linear.out_features, linear.bias is not None,
                     activation_bits)
        codes, gamma = naive.quantize_ternary(weight)
        module.weight = _frozen(naive.pack_ternary(codes).to(weight.device))
        module.weight_scale = gamma.to(weight.device)
        _copy_bias(module, linear)
        return module

    def codes(self) -> Tensor:
        """The unpacked (out, in) int8 codes, each -1, 0 or 1."""
        return naive.unpack_ternary(self.weight, self.in_features)

    def dequantized_weight(self) -> Tensor:
        return dequantize_ternary_packed(self.weight, self.weight_scale, self.in_features)

    def _compute(self, x: Tensor) -> Tensor:
        if self.activation_bits is None:
            return weight_only_linear(x, self.dequantized_weight(), self.bias)
        shape = x.shape
        q, x_scale = _quantize_tokens(x.reshape(-1, shape[-1]))
        acc = int8_matmul(q, ternary_codes(self.weight, self.in_features).t())
        out = acc.to(x_scale.dtype).mul_(x_scale * self.weight_scale)
        if self.bias is not None:
            out.add_(self.bias.to(out.dtype))
        return out.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def forward_reference(self, x: Tensor) -> Tensor:
        """The naive ternary product (activations quantized per token when ``activation_bits`` is
        8), for tests: ``x (..., in_features)`` -> ``(..., out_features)``."""
        return naive.ternary_linear_reference(x, self.codes(), self.weight_scale, self.bias,
                                              self.activation_bits)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation_bits={self.activation_bits}"


# --------------------------------------------------------------------------- fake quant
@register_module(name="leantorch.FakeQuantLinear")
class FakeQuantLinear(nn.Module):
    """A float Linear for quantization-aware training: the forward pass uses the weight (and,
    for ``int8_dynamic`` and 8-bit ternary, the input) quantized then dequantized exactly as
    the real module of ``scheme`` would; gradients pass straight through the rounding.

    scheme: ``int8_dynamic`` (-> :class:`Int8DynamicLinear`), ``int8_weight`` / ``int4_weight``
    (-> :class:`WeightOnlyLinear` with ``group_size`` and ``symmetric``) or ``ternary``
    (-> :class:`TernaryLinear` with ``activation_bits``). :meth:`to_quantized` builds it.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 scheme: str = "int8_dynamic", group_size: int | None = None,
                 symmetric: bool = True, activation_bits: int | None = 8) -> None:
        super().__init__()
        check_scheme(scheme)
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        bits = {"int8_dynamic": 8, "int8_weight": 8, "int4_weight": 4}.get(scheme)
        if scheme == "int8_dynamic" and group_size not in (None, in_features):
            raise LeanError(f"FakeQuantLinear: group_size={group_size!r} with scheme "
                            "'int8_dynamic', whose weights have one scale per output channel; "
                            "leave group_size=None")
        if scheme == "int8_dynamic" and not symmetric:
            raise LeanError("FakeQuantLinear: symmetric=False with scheme 'int8_dynamic', whose "
                            "weights are symmetric; use symmetric=True")
        self.group_size = in_features if group_size is None else group_size
        if bits is not None:
            check_group_size(in_features, bits, self.group_size)
        self.symmetric = symmetric
        if scheme == "ternary":
            check_activation_bits(activation_bits)
        self.activation_bits = {"int8_dynamic": 8, "ternary": activation_bits}.get(scheme)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.register_parameter("bias", _bias_parameter(out_features, bias))

    def spec(self) -> dict[str, Any]:
        """Constructor arguments: ``in_features``, ``out_features``, ``bias`` (bool), ``scheme``,
        ``group_size``, ``symmetric`` and ``activation_bits`` (None where the scheme keeps float
        activations)."""
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "scheme": self.scheme,
                "group_size": self.group_size, "symmetric": self.symmetric,
                "activation_bits": self.activation_bits}

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: str, group_size: int | None = None,
                    symmetric: bool = True, activation_bits: int | None = 8) -> FakeQuantLinear:
        """A trainable copy of ``linear`` (weight cloned, ``requires_grad`` kept) that rounds as
        ``scheme`` will in the forward pass."""
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, scheme,
                     group_size, symmetric, activation_bits)
        module.weight = nn.Parameter(linear.weight.detach().clone(),
                                     requires_grad=linear.weight.requires_grad)
        _copy_bias(module, linear)
        return module

    def fake_weight(self) -> Tensor:
        """The weight as the real module will see it (gradient straight through)."""
        if self.scheme == "ternary":
            return fake_quantize_ternary(self.weight)
        bits = 4 if self.scheme == "int4_weight" else 8
        return fake_quantize_groupwise(self.weight, bits, self.group_size, self.symmetric)

    def forward(self, x: Tensor) -> Tensor:
        """``x (..., in_features)`` -> ``(..., out_features)`` with the fake-quantized weight (and,
        when ``activation_bits`` is set, per-token fake-quantized ``x``); straight-through grads."""
        if self.activation_bits is not None:
            x = fake_quantize_per_token(x)
        return torch.nn.functional.linear(x, self.fake_weight().to(x.dtype), self.bias)

    def to_linear(self) -> nn.Linear:
        """A plain Linear holding the current float weight (what the real module quantizes)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        linear.weight.data.copy_(self.weight.detach())
        if self.bias is not None:
            linear.bias.data.copy_(self.bias.detach())
        return linear

    def to_quantized(self) -> nn.Module:
        """The real quantized module of this scheme, from the current weight."""
        linear = self.to_linear()
        build: dict[str, Callable[[], nn.Module]] = {
            "int8_dynamic": lambda: Int8DynamicLinear.from_linear(linear),
            "int8_weight": lambda: WeightOnlyLinear.from_linear(linear, 8, self.group_size,
                                                                self.symmetric),
            "int4_weight": lambda: WeightOnlyLinear.from_linear(linear, 4, self.group_size,
                                                                self.symmetric),
            "ternary": lambda: TernaryLinear.from_linear(linear, self.activation_bits),
        }
        return build[self.scheme]()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"scheme={self.scheme}, group_size={self.group_size}, "
                f"symmetric={self.symmetric}, activation_bits={self.activation_bits}")


# --------------------------------------------------------------------------- checks
def check_scheme(scheme: object) -> None:
    if scheme not in SCHEMES:
        raise LeanError(f"scheme={describe(scheme)} is not a quantization scheme; accepted: "
                        f"{', '.join(SCHEMES)}")


def check_activation_bits(activation_bits: object) -> None:
    if activation_bits not in (8, None) or isinstance(activation_bits, bool):
        raise LeanError(f"activation_bits={describe(activation_bits)}: accepted are 8 (int8 "
                        "per-token activations, as in BitNet b1.58) or None (float activations)")


def group_size_problem(in_features: int, bits: int, group_size: int) -> str | None:
    """Why ``group_size`` cannot quantize a layer with ``in_features`` inputs (None if it can)."""
    if in_features % group_size:
        return (f"in_features={in_features} is not a multiple of group_size={group_size}")
    if bits == 4 and in_features % 2:
        return f"in_features={in_features} is odd; int4 packs two codes per byte"
    return None


def check_group_size(in_features: int, bits: int, group_size: int) -> None:
    problem = group_size_problem(in_features, bits, group_size)
    if problem is not None:
        raise LeanError(f"group_size={group_size}: {problem}")
