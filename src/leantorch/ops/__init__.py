"""Functional kernels in plain PyTorch, one sub-package per op family (``attention``,
``linear_attn``, ...). Each family keeps a readable ``naive.py`` reference beside its fast paths."""
