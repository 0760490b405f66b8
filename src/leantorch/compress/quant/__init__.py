"""Quantization transforms (``quant.int8_dynamic``, ``quant.int8_weight``, ``quant.int4_weight``,
``quant.llm_int8``, ``quant.fake_quantize``, ``quant.convert``) and the modules they leave in a model.
Importing this package registers the transforms and the module classes."""

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
    "SCHEMES",
    "FakeQuantLinear",
    "Int8DynamicLinear",
    "LLMInt8Linear",
    "TernaryLinear",
    "WeightOnlyLinear",
    "convert",
    "fake_quantize",
    "int4_weight",
    "int8_dynamic",
    "int8_weight",
    "llm_int8",
]
