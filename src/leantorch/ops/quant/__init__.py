"""Quantization kernels: symmetric/asymmetric grids, per-token and group-wise scales, int4 and
ternary packing, the int8 x int8 -> int32 matmul, and fake quantization with a straight-through
gradient. ``naive.py`` is the readable reference (dequantize, then a float matmul); ``int8.py``,
``weight_only.py`` and ``fake.py`` are the paths the modules in :mod:`leantorch.compress.quant`
run, each tested against it."""

from leantorch.ops.quant.fake import (
    fake_quantize_groupwise,
    fake_quantize_per_token,
    fake_quantize_ternary,
    straight_through,
)
from leantorch.ops.quant.int8 import (
    int8_dynamic_linear,
    int8_matmul,
    llm_int8_linear,
    quantize_per_token_fast,
)
from leantorch.ops.quant.naive import (
    dequantize_groupwise,
    dequantize_ternary,
    pack_int4,
    pack_ternary,
    quantize_groupwise,
    quantize_per_tensor,
    quantize_per_token,
    quantize_ternary,
    unpack_int4,
    unpack_ternary,
)
from leantorch.ops.quant.weight_only import (
    dequantize_int4,
    dequantize_int8,
    dequantize_ternary_packed,
    ternary_codes,
    weight_only_linear,
)

__all__ = [
    "dequantize_groupwise",
    "dequantize_int4",
    "dequantize_int8",
    "dequantize_ternary",
    "dequantize_ternary_packed",
    "fake_quantize_groupwise",
    "fake_quantize_per_token",
    "fake_quantize_ternary",
    "int8_dynamic_linear",
    "int8_matmul",
    "llm_int8_linear",
    "pack_int4",
    "pack_ternary",
    "quantize_groupwise",
    "quantize_per_tensor",
    "quantize_per_token",
    "quantize_per_token_fast",
    "quantize_ternary",
    "straight_through",
    "ternary_codes",
    "unpack_int4",
    "unpack_ternary",
    "weight_only_linear",
]
