"""The op rules: how each aten op relates the axes of its inputs and outputs.

Every rule registers itself with :func:`~.registry.rule` in the one registry
:data:`~.registry.RULES` (op name -> rule), which the propagator (:mod:`..propagation`) looks
up for each node of the traced graph. Importing this package imports every family:

- :mod:`.layers`: linear / matmul / einsum, convolutions, normalisations, LSTM, embedding, and
  the stand-in of a leaf module;
- :mod:`.shapes`: views and reshapes, permutes, expand / repeat, slicing, split / cat / stack,
  pad, roll;
- :mod:`.index_reduce`: indexing, scatter, one_hot, histc, where, reductions, softmax-like ops,
  pooling;
- :mod:`.attention_moe`: scaled dot-product attention, grouped expert matmuls, head tagging,
  and the mixture-of-experts rule.

An op without a rule is pointwise (broadcast), a pass-through, a factory, or opaque (its
tensors are fixed): see :meth:`..propagation.Propagator.call`.
"""

from leantorch.compress.graph.rules import attention_moe, index_reduce, layers, shapes
from leantorch.compress.graph.rules.registry import RULES, Unsupported, rule

__all__ = ["RULES", "Unsupported", "attention_moe", "index_reduce", "layers", "rule", "shapes"]
