"""Linear attention and gated linear attention (GLA) in three modes: parallel, recurrent, chunk.

>>> import torch
>>> from leantorch.ops.linear_attn import gated_linear_attention, naive_gla
>>> q, k, v = (torch.randn(1, 2, 100, 16, dtype=torch.float64) for _ in range(3))
>>> log_decay = torch.nn.functional.logsigmoid(torch.randn(1, 2, 100, 16,
...                                                        dtype=torch.float64)) / 16
>>> out = gated_linear_attention(q, k, v, log_decay, mode="chunk", chunk_size=32)
>>> torch.allclose(out, naive_gla(q, k, v, log_decay))
True

See docs/linear_attention.md for the modes, their costs and measured speed.
"""

from leantorch.ops.linear_attn.api import gated_linear_attention, linear_attention
from leantorch.ops.linear_attn.feature_maps import (
    FEATURE_MAPS,
    elu_feature_map,
    feature_dim,
    feature_map,
    identity_feature_map,
    relu_feature_map,
    taylor_feature_map,
)
from leantorch.ops.linear_attn.naive import naive_gla, naive_linear_attention
from leantorch.ops.linear_attn.recurrent import gla_step, linear_attention_step
from leantorch.ops.linear_attn.state import LinearAttentionState

__all__ = [
    "FEATURE_MAPS",
    "LinearAttentionState",
    "elu_feature_map",
    "feature_dim",
    "feature_map",
    "gated_linear_attention",
    "gla_step",
    "identity_feature_map",
    "linear_attention",
    "linear_attention_step",
    "naive_gla",
    "naive_linear_attention",
    "relu_feature_map",
    "taylor_feature_map",
]
