"""Quantization transforms (``quant.int8_dynamic``, ``quant.int8_weight``, ``quant.int4_weight``,
``quant.llm_int8``, ``quant.fake_quantize``, ``quant.convert``), the precision casts (``quant.bf16``,
``quant.fp16``, ``quant.autocast``) and the modules they leave in a model.
Importing this package registers the transforms and the module classes."""

from leantorch.compress.quant.cast import (
    DEFAULT_ISLANDS,
    Float32Island,
    autocast,
    bf16,
    fp16,
    precision,
)
from leantorch.compress.quant.modules import (
    SCHEMES,
    FakeQuantLinear,
    Int8DynamicLinear,
    LLMInt8Linear,
    TernaryLinear,
    WeightOnlyLinear,
)
from leantorch.compress.quant.transforms import (
    convert,
    fake_quantize,
    int4_weight,
    int8_dynamic,
    int8_weight,
    llm_int8,
)

__all__ = [
    "DEFAULT_ISLANDS",
    "SCHEMES",
    "FakeQuantLinear",
    "Float32Island",
    "Int8DynamicLinear",
    "LLMInt8Linear",
    "TernaryLinear",
    "WeightOnlyLinear",
    "autocast",
    "bf16",
    "convert",
    "fake_quantize",
    "fp16",
    "int4_weight",
    "int8_dynamic",
    "int8_weight",
    "llm_int8",
    "precision",
]
