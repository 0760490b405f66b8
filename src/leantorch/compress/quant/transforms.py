"""Quantization transforms, registered by name for recipes:

======================= ================================================================
``quant.int8_dynamic``  Linear -> :class:`Int8DynamicLinear` (int8 weights per channel, int8
                        activations per token, int32 accumulation)
``quant.int8_weight``   Linear -> :class:`WeightOnlyLinear` (8-bit, ``group_size``, symmetric
                        by default)
``quant.int4_weight``   Linear -> :class:`WeightOnlyLinear` (4-bit packed, ``group_size`` 128,
                        asymmetric by default)
``quant.llm_int8``      Linear -> :class:`LLMInt8Linear` (outlier features above
                        ``threshold`` in float)
``quant.fake_quantize`` Linear -> :class:`FakeQuantLinear` (QAT: ``scheme`` int8_dynamic,
                        int8_weight, int4_weight or ternary)
``quant.convert``       FakeQuantLinear -> the real module of its scheme
======================= ================================================================

Every transform copies the model unless ``inplace=True``, selects layers with ``include`` /
``exclude`` globs over module paths, and reports in ``Change.skipped`` the selected layers it
left alone and why (a weight tied to another module, a group size that does not divide the
input features, a Linear subclass whose owner reads ``.weight`` directly, GPT-2's ``Conv1D``).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from leantorch.compress.change import (
    Change,
    apply_transform,
    replace_module,
    run_calibration,
    select_modules,
)
from leantorch.compress.quant.modules import (
    FakeQuantLinear,
    Int8DynamicLinear,
    LLMInt8Linear,
    TernaryLinear,
    WeightOnlyLinear,
    check_activation_bits,
    check_scheme,
    group_size_problem,
)
from leantorch.compress.registry import register_transform
from leantorch.errors import LeanError, LeanTypeError, describe

__all__ = [
    "convert",
    "fake_quantize",
    "int4_weight",
    "int8_dynamic",
    "int8_weight",
    "llm_int8",
]

Patterns = str | Sequence[str] | None
QUANTIZED = (Int8DynamicLinear, WeightOnlyLinear, TernaryLinear)


# --------------------------------------------------------------------------- helpers
def _tensor_bytes(module: nn.Module) -> int:
    """Bytes of a module's own parameters and buffers, bias excluded (the weight's storage)."""
    tensors = [t for n, t in list(module.named_parameters(recurse=False))
               + list(module.named_buffers(recurse=False)) if t is not None and n != "bias"]
    return sum(t.numel() * t.element_size() for t in tensors)


def _weight_owners(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> every dotted name it is reachable under (tied weights have several)."""
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    return owners


def _stored_weight(module: nn.Linear) -> torch.Tensor:
    """The Parameter behind ``module.weight`` (the original under a parametrization)."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


def _skip_reason(path: str, module: nn.Linear, owners: dict[int, list[str]]) -> str | None:
    plain_type = type(module).__bases__[0] if parametrize.is_parametrized(module) else type(module)
    if plain_type is not nn.Linear:
        return (f"{plain_type.__name__} subclasses nn.Linear and its owner may read .weight "
                "directly (nn.MultiheadAttention does); only plain nn.Linear is replaced")
    stored = _stored_weight(module)
    if not stored.is_floating_point():
        return f"weight dtype {stored.dtype} is not floating point"
    if stored.is_meta:
        return "weight is on the meta device (no values to quantize)"
    names = owners.get(id(stored), [])
    if len(names) > 1:
        others = [n for n in names if not n.startswith(f"{path}.")]
        return (f"weight is tied to {', '.join(others) or 'another module'}: quantizing it here "
                "would store a second copy")
    return None


def _is_gpt2_conv1d(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def _quantize_linears(
    name: str,
    model: nn.Module,
    make: Callable[[nn.Linear], nn.Module],
    *,
    params: dict[str, Any],
    include: Patterns,
    exclude: Patterns,
    inplace: bool,
    example_inputs: Any,
    layer_problem: Callable[[nn.Linear], str | None] | None = None,
    finish: Callable[[nn.Module, Change], None] | None = None,
) -> tuple[nn.Module, Change]:
    """Replace every selected Linear by ``make(linear)``; the shared body of the transforms."""

    def edit(target: nn.Module, change: Change) -> None:
        owners = _weight_owners(target)
        before = after = 0
        for path, module in select_modules(target, nn.Module, include, exclude):
            if _is_gpt2_conv1d(module):
                change.skipped[path] = ("transformers Conv1D (GPT-2 style, weight stored in x "
                                        "out) is not an nn.Linear; left in float")
                continue
            if not isinstance(module, nn.Linear):
                continue
            reason = _skip_reason(path, module, owners)
            if reason is None and layer_problem is not None:
                reason = layer_problem(module)
            if reason is not None:
                change.skipped[path] = reason
                continue
            new = make(module)
            before += module.weight.numel() * module.weight.element_size()
            after += _tensor_bytes(new)
            replace_module(target, path, new)
            change.replaced.append(path)
        change.details.update({
            "layers_quantized": len(change.replaced),
            "weight_bytes_before": before,
            "weight_bytes_after": after,
            "weight_compression": round(before / after, 4) if after else None,
        })
        if finish is not None:
            finish(target, change)

    return apply_transform(name, model, edit, params=params, example_inputs=example_inputs,
                           inplace=inplace)


def _check_group_size(value: object, name: str = "group_size") -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LeanError(f"{name}={describe(value)}: expected a positive int (input features "
                        "per scale) or None (one scale per output channel)")


def _check_bool(value: object, name: str) -> None:
    if not isinstance(value, bool):
        raise LeanTypeError(f"{name}={describe(value)}: expected True or False")


def _group_problem(bits: int, group_size: int | None) -> Callable[[nn.Linear], str | None]:
    def problem(linear: nn.Linear) -> str | None:
        size = linear.in_features if group_size is None else group_size
        return group_size_problem(linear.in_features, bits, size)

    return problem


def integer_matmul_path(device: torch.device) -> str:
    """Which integer matmul an int8 layer runs on ``device``."""
    if device.type == "cpu":
        from leantorch.ops.quant.int8 import onednn_available

        if onednn_available():
            return ("oneDNN int8 GEMM with the weight scales fused "
                    "(torch.ops.onednn.qlinear_pointwise, weights prepacked once per layer)")
        return "torch._int_mm (cpu)"
    if device.type == "cuda":
        return "torch._int_mm (cuda; shapes it rejects are zero-padded, exact)"
    return f"exact float32 fallback (no integer matmul on {device.type})"


def _model_device(model: nn.Module) -> torch.device:
    first = next(iter(model.parameters()), None)
    return torch.device("cpu") if first is None else first.device


# --------------------------------------------------------------------------- transforms
COMPUTE_DTYPES = ("auto", "bfloat16", "float32")
# what stays float32 when the rest of the model computes in bfloat16: normalisations read
# means and variances, which bfloat16's 8-bit mantissa would blur (their kernels accumulate in
# float32 and return the input's dtype, so a bfloat16 activation meets float32 weights there)
FLOAT32_ISLANDS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, nn.RMSNorm)


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX-BF16 on x86,
    BF16 on Arm), per :func:`leantorch.measure.hardware.cpu_info`."""
    from leantorch.measure.hardware import cpu_info

    features = cpu_info()["features"] or {}
    return any(features.get(name) for name in ("avx512_bf16", "amx_bf16", "bf16"))


def resolve_compute_dtype(compute_dtype: object) -> torch.dtype | None:
    """``None`` / ``"float32"`` -> None (leave the model's dtypes), ``"bfloat16"`` (or
    ``torch.bfloat16``) -> bfloat16, ``"auto"`` -> bfloat16 where :func:`cpu_has_bf16`, else
    None."""
    if compute_dtype is None or compute_dtype is torch.float32:
        return None
    if compute_dtype is torch.bfloat16:
        return torch.bfloat16
    if not isinstance(compute_dtype, str) or compute_dtype not in COMPUTE_DTYPES:
        raise LeanError(f"quant.int8_dynamic: compute_dtype={describe(compute_dtype)}; "
                        f"expected one of None, {', '.join(map(repr, COMPUTE_DTYPES))} or "
                        "torch.bfloat16")
    if compute_dtype == "auto":
        return torch.bfloat16 if cpu_has_bf16() else None
    return torch.bfloat16 if compute_dtype == "bfloat16" else None


def _cast_outside_int8(model: nn.Module, dtype: torch.dtype) -> list[str]:
    """Cast the floating parameters and buffers of every module except the int8 layers (whose
    scales stay float32) and the normalisation layers (float32 islands) to ``dtype``. Returns
    the dotted names of the modules that keep float32 tensors."""
    kept: list[str] = []
    for path, module in model.named_modules():
        if isinstance(module, (Int8DynamicLinear, *FLOAT32_ISLANDS)):
            if any(t.is_floating_point() for t in module.parameters(recurse=False)):
                kept.append(path)
            continue
        for param in list(module.parameters(recurse=False)):
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer is not None and buffer.is_floating_point() and buffer.dtype != dtype:
                setattr(module, name, buffer.to(dtype))
    return kept


@register_transform("quant.int8_dynamic")
def int8_dynamic(
    model: nn.Module,
    *,
    compute_dtype: str | torch.dtype | None = None,
    share_quantization: bool = True,
    compile: bool = False,
    include: Patterns = None,
    exclude: Patterns = None,
    inplace: bool = False,
    example_inputs: Any = None,
) -> tuple[nn.Module, Change]:
    """Replace Linear layers by :class:`Int8DynamicLinear`: per-output-channel symmetric int8
    weights, per-token symmetric int8 activations computed at run time, int32 accumulation.

    Args:
        compute_dtype: what runs outside the int8 GEMMs. None (default) or ``"float32"``: the
            model keeps its dtypes. ``"bfloat16"``: every other floating parameter and buffer
            is cast to bfloat16 (attention matmuls, GELU, residual adds, embeddings then run
            in bfloat16) except normalisation layers, which keep float32 weights and compute in
            float32; the int8 layers quantize bfloat16 activations directly and their GEMM
            writes bfloat16. The model's outputs are then bfloat16, and float inputs it takes
            (not token ids) must be given in bfloat16. ``"auto"``: bfloat16 on a CPU with
            AVX512-BF16 / AMX, else None.
        share_quantization: int8 layers that read the same unchanged tensor (q, k, v
            projections) quantize it once (default True); bit-identical to quantizing it
            three times.
        compile: the per-token quantization runs through ``torch.compile`` (inductor fuses
            its six passes into two loops; bit-identical). The first forward pass compiles
            (tens of seconds); needs a C++ compiler, else it logs why and runs eagerly.
        include: ``fnmatch`` globs over module paths (``"encoder.layer.*"``); only
            Linear layers matching one are replaced (None: all of them).
        exclude: globs of module paths left as they are, even when ``include`` matches.

    Returns ``(new_model, Change)``; ``Change.details["integer_matmul"]`` names the kernel,
    ``["compute_dtype"]`` what runs outside it and ``["float32_modules"]`` the modules that
    keep float32 tensors.
    """
    dtype = resolve_compute_dtype(compute_dtype)
    _check_bool(share_quantization, "share_quantization")
    _check_bool(compile, "compile")

    def finish(target: nn.Module, change: Change) -> None:
        change.details["integer_matmul"] = integer_matmul_path(_model_device(target))
        change.details["compute_dtype"] = str(dtype or "unchanged").replace("torch.", "")
        if dtype is not None:
            change.details["float32_modules"] = _cast_outside_int8(target, dtype)

    return _quantize_linears(
        "quant.int8_dynamic", model,
        lambda linear: Int8DynamicLinear.from_linear(linear, share_quantization, compile),
        params={"compute_dtype": None if compute_dtype is None else
                str(compute_dtype).replace("torch.", ""),
                "share_quantization": share_quantization, "compile": compile,
                "include": include,
                "exclude": exclude},
        include=include, exclude=exclude, inplace=inplace, example_inputs=example_inputs,
        finish=finish)


@register_transform("quant.int8_weight")
def int8_weight(
    model: nn.Module,
    *,
    group_size: int | None = None,
    symmetric: bool = True,
    include: Patterns = None,
    exclude: Patterns = None,
    inplace: bool = False,
    example_inputs: Any = None,
) -> tuple[nn.Module, Change]:
    """Replace Linear layers by 8-bit weight-only :class:`WeightOnlyLinear` (float
    activations). Layers whose ``in_features`` the group size does not divide are skipped.

    Args:
        group_size: input features per scale (None: one scale per output channel).
        symmetric: codes in [-127, 127] times a scale, else [0, 255] times a scale plus a
            float offset.
        include: ``fnmatch`` globs over module paths (``"encoder.layer.*"``); only
            Linear layers matching one are replaced (None: all of them).
        exclude: globs of module paths left as they are, even when ``include`` matches.
    """
    _check_group_size(group_size)
    _check_bool(symmetric, "symmetric")
    return _quantize_linears(
        "quant.int8_weight", model,
        lambda linear: WeightOnlyLinear.from_linear(linear, 8, group_size, symmetric),
        params={"group_size": group_size, "symmetric": symmetric, "include": include,
                "exclude": exclude},
        include=include, exclude=exclude, inplace=inplace, example_inputs=example_inputs,
        layer_problem=_group_problem(8, group_size))


@register_transform("quant.int4_weight")
def int4_weight(
    model: nn.Module,
    *,
    group_size: int | None = 128,
    symmetric: bool = False,
    include: Patterns = None,
    exclude: Patterns = None,
    inplace: bool = False,
    example_inputs: Any = None,
) -> tuple[nn.Module, Change]:
    """Replace Linear layers by 4-bit weight-only :class:`WeightOnlyLinear`, two codes per
    byte. Layers whose ``in_features`` the group size does not divide are skipped.

    Args:
        group_size: input features per scale (default 128; None: per output channel).
        symmetric: False (default): codes 0..15 times a scale plus a float offset per group;
            True: codes -7..7 times a scale.
        include: ``fnmatch`` globs over module paths (``"encoder.layer.*"``); only
            Linear layers matching one are replaced (None: all of them).
        exclude: globs of module paths left as they are, even when ``include`` matches.
    """
    _check_group_size(group_size)
    _check_bool(symmetric, "symmetric")
    return _quantize_linears(
        "quant.int4_weight", model,
        lambda linear: WeightOnlyLinear.from_linear(linear, 4, group_size, symmetric),
        params={"group_size": group_size, "symmetric": symmetric, "include": include,
                "exclude": exclude},
        include=include, exclude=exclude, inplace=inplace, example_inputs=example_inputs,
        layer_problem=_group_problem(4, group_size))


@register_transform("quant.llm_int8")
def llm_int8(
    model: nn.Module,
    *,
    threshold: float = 6.0,
    include: Patterns = None,
    exclude: Patterns = None,
    inplace: bool = False,
    example_inputs: Any = None,
    calibration: Sequence[Any] | None = None,
) -> tuple[nn.Module, Change]:
    """Replace Linear layers by :class:`LLMInt8Linear` (LLM.int8(): input features with
    ``|x| > threshold`` in the current batch stay in float, the rest run int8 x int8).

    The fraction of input features (hence of MACs) kept in 8 bits depends on the data: it is
    measured on ``calibration`` (a list of model inputs), else on ``example_inputs``, and
    reported in ``Change.details["int8_fraction"]`` (overall) and
    ``["int8_fraction_per_layer"]``; each module also keeps a running ``int8_fraction``.

    Args:
        threshold: magnitude above which an input feature (a column of the batch's
            activations) is an outlier kept in float; 6.0 as in the LLM.int8() paper.
            Higher keeps more of the layer in 8 bits.
        include: ``fnmatch`` globs over module paths (``"encoder.layer.*"``); only
            Linear layers matching one are replaced (None: all of them).
        exclude: globs of module paths left as they are, even when ``include`` matches.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or \
            not threshold > 0:
        raise LeanError(f"threshold={describe(threshold)}: expected a positive number "
                        "(activation magnitude above which a feature stays in float; "
                        "LLM.int8() uses 6.0)")
    threshold = float(threshold)

    def finish(target: nn.Module, change: Change) -> None:
        batches = list(calibration) if calibration else (
            [example_inputs] if example_inputs is not None else [])
        layers = {p: m for p, m in target.named_modules() if p in set(change.replaced)}
        change.details["integer_matmul"] = integer_matmul_path(_model_device(target))
        change.details["int8_fraction"] = None
        if not batches:
            change.details["int8_fraction_note"] = (
                "no calibration or example inputs: read LLMInt8Linear.int8_fraction after "
                "running data through the model")
            return
        run_calibration(target, batches)
        seen = sum(m.columns_seen for m in layers.values())
        outliers = sum(m.outlier_columns_seen for m in layers.values())
        change.details["int8_fraction"] = (1.0 - outliers / seen) if seen else None
        change.details["int8_fraction_per_layer"] = {p: m.int8_fraction
                                                     for p, m in layers.items()}
        change.details["measured_on_batches"] = len(batches)
        for m in layers.values():
            m.reset_statistics()

    new, change = _quantize_linears(
        "quant.llm_int8", model,
        lambda linear: LLMInt8Linear.from_linear(linear, threshold),
        params={"threshold": threshold, "include": include, "exclude": exclude},
        include=include, exclude=exclude, inplace=inplace, example_inputs=example_inputs,
        finish=finish)
    for module in new.modules():  # the cost measurement after the edit ran the model again
        if isinstance(module, LLMInt8Linear):
            module.reset_statistics()
    return new, change


@register_transform("quant.fake_quantize")
def fake_quantize(
    model: nn.Module,
    *,
    scheme: str = "int8_dynamic",
    group_size: int | None = None,
    symmetric: bool | None = None,
    activation_bits: int | None = 8,
    include: Patterns = None,
    exclude: Patterns = None,
    inplace: bool = False,
    example_inputs: Any = None,
) -> tuple[nn.Module, Change]:
    """Prepare for quantization-aware training: replace Linear layers by
    :class:`FakeQuantLinear`, whose forward quantizes-dequantizes like the real module of
    ``scheme`` and whose backward passes gradients straight through. Fine-tune, then
    ``quant.convert`` makes the real quantized model.

    Args:
        scheme: ``int8_dynamic`` | ``int8_weight`` | ``int4_weight`` | ``ternary`` (BitNet
            b1.58 absmean weights; ``activation_bits`` 8 (default, per-token int8 as in
            BitNet) or None).
        group_size: input features per weight scale, as in ``quant.int8_weight`` /
            ``quant.int4_weight`` (default: per channel for 8 bits, 128 for 4).
        symmetric: as in ``quant.int8_weight`` / ``quant.int4_weight`` (default: True for 8
            bits, False for 4).
        activation_bits: ``ternary`` only: 8 quantizes activations per token, None keeps them
            float.
        include: ``fnmatch`` globs over module paths (``"encoder.layer.*"``); only
            Linear layers matching one are replaced (None: all of them).
        exclude: globs of module paths left as they are, even when ``include`` matches.
    """
    check_scheme(scheme)
    _check_group_size(group_size)
    if scheme == "int4_weight" and group_size is None:
        group_size = 128
    if symmetric is None:
        symmetric = scheme != "int4_weight"
    _check_bool(symmetric, "symmetric")
    if scheme == "ternary":
        check_activation_bits(activation_bits)
    if scheme in ("int8_dynamic", "ternary") and group_size is not None:
        granularity = "output channel" if scheme == "int8_dynamic" else "tensor"
        raise LeanError(f"group_size={group_size} with scheme={scheme!r}, which uses one "
                        f"weight scale per {granularity}; leave group_size=None")
    if scheme == "int8_dynamic" and not symmetric:
        raise LeanError("symmetric=False with scheme='int8_dynamic': int8 dynamic weights are "
                        "symmetric; leave symmetric unset")
    bits = 4 if scheme == "int4_weight" else 8
    problem = _group_problem(bits, group_size) if scheme != "ternary" else None
    return _quantize_linears(
        "quant.fake_quantize", model,
        lambda linear: FakeQuantLinear.from_linear(linear, scheme, group_size, symmetric,
                                                   activation_bits),
        params={"scheme": scheme, "group_size": group_size, "symmetric": symmetric,
                "activation_bits": activation_bits if scheme == "ternary" else None,
                "include": include, "exclude": exclude},
        include=include, exclude=exclude, inplace=inplace, example_inputs=example_inputs,
        layer_problem=problem)


@register_transform("quant.convert")
def convert(
    model: nn.Module,
    *,
    include: Patterns = None,
    exclude: Patterns = None,
    inplace: bool = False,
    example_inputs: Any = None,
) -> tuple[nn.Module, Change]:
    """Turn every selected :class:`FakeQuantLinear` into the real quantized module of its
    scheme (quantized from its current, possibly fine-tuned, weight). Weight-only schemes give
    bit-identical outputs; schemes with int8 activations differ only by float rounding (the
    real module accumulates in int32).

    Args:
        include: ``fnmatch`` globs over module paths (``"encoder.layer.*"``); only
            FakeQuantLinear layers matching one are replaced (None: all of them).
        exclude: globs of module paths left as they are, even when ``include`` matches.
    """
    if not any(isinstance(m, FakeQuantLinear) for m in model.modules()):
        raise LeanError("quant.convert: the model has no FakeQuantLinear layer; run quant.fake_quantize "
                        "(and fine-tune) first, or use quant.int8_dynamic / quant.int8_weight / "
                        "quant.int4_weight directly")

    def edit(target: nn.Module, change: Change) -> None:
        schemes: dict[str, int] = {}
        for path, module in select_modules(target, FakeQuantLinear, include, exclude):
            replace_module(target, path, module.to_quantized())
            change.replaced.append(path)
            schemes[module.scheme] = schemes.get(module.scheme, 0) + 1
        change.details["schemes"] = schemes

    return apply_transform("quant.convert", model, edit,
                           params={"include": include, "exclude": exclude},
                           example_inputs=example_inputs, inplace=inplace)
