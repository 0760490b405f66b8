"""Functional kernels in plain PyTorch, one sub-package per op family (``attention``,
``linear_attn``, ``moe``, ``quant``). Each family keeps a readable ``naive.py`` reference beside its
fast paths. The families load on first use (``leantorch.ops.attention.naive_attention`` works
after a bare ``import leantorch``)."""

from leantorch._lazy import lazy_submodules as _lazy_submodules

__all__ = ["attention", "linear_attn", "moe", "quant"]

# imported on first attribute access (PEP 562)
__getattr__, __dir__ = _lazy_submodules(__name__, __all__, globals())
