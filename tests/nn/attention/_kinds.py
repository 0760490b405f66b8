"""Small float64 layers of every kind, shared by the attention-module tests."""

from __future__ import annotations

import torch

from leantorch.nn.attention import KINDS, Attention

DIM = 32
HEADS = 4


def block_mask(heads: int = 1, blocks: int = 8) -> torch.Tensor:
    """A fixed pattern with the diagonal on (so no causal row is empty) and some blocks off."""
    generator = torch.Generator().manual_seed(7)
    mask = torch.rand(heads, blocks, blocks, generator=generator) > 0.4
    return mask | torch.eye(blocks, dtype=torch.bool)


KIND_ARGS: dict[str, dict] = {
    "exact": {},
    "sliding": {"window": 5},
    "block_sparse": {"block_size": 4, "block_mask": block_mask()},
    "topk": {"topk": 3},
    "mla": {"kv_lora_rank": 12},
    "linear": {},
    "gla": {},
    "based": {"window": 4, "feature_dim": 4},
}
assert set(KIND_ARGS) == set(KINDS)


def make(kind: str, num_kv_heads: int | None = 2, seed: int = 0, dtype=torch.float64,
         **overrides) -> Attention:
    torch.manual_seed(seed)
    args = {**KIND_ARGS[kind], **overrides}
    if kind == "mla":
        num_kv_heads = None
    layer = Attention(DIM, HEADS, num_kv_heads, kind, **args).to(dtype)
    return layer.eval()


def tokens(batch: int = 2, n: int = 13, seed: int = 1, dtype=torch.float64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n, DIM, generator=generator).to(dtype)
