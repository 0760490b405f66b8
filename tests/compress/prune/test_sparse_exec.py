"""Sparse execution: the CSR and BSR paths equal their loop references and the dense masked
layer (values and gradients), make_sparse keeps model outputs, costs count what executes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import leantorch
from leantorch.compress.prune.block import prune_block
from leantorch.compress.prune.masks import prune_magnitude
from leantorch.compress.prune.nm import prune_nm
from leantorch.compress.prune.sparse_exec import (
    BREAK_EVEN_SPARSITY,
    SparseLinear,
    bsr_linear,
    bsr_linear_reference,
    csr_linear,
    csr_linear_reference,
    make_sparse,
)
from leantorch.compress.registry import get_transform
from leantorch.errors import LeanError
from tests.conftest import count


def sparse_weight(out_f: int, in_f: int, density: float, block: int = 1,
                  dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Random weight whose non-zeros fill a random ``density`` of its ``block`` tiles."""
    keep = torch.rand(out_f // block, in_f // block) < density
    keep = keep.repeat_interleave(block, 0).repeat_interleave(block, 1)
    return torch.randn(out_f, in_f, dtype=dtype) * keep


def scatter(layer: SparseLinear, values: torch.Tensor) -> torch.Tensor:
    """The dense matrix with ``values`` at the positions ``layer`` stores."""
    build = torch.sparse_csr_tensor if layer.format == "csr" else torch.sparse_bsr_tensor
    return build(layer.crow_indices, layer.col_indices, values.detach(),
                 (layer.out_features, layer.in_features), check_invariants=True).to_dense()


def parts(layer: SparseLinear) -> tuple[torch.Tensor, ...]:
    return layer.crow_indices, layer.col_indices, layer.values, layer.bias


# --------------------------------------------------------------------------- kernels
@settings(max_examples=40, deadline=None)
@given(fmt=st.sampled_from(["csr", "bsr"]), b=st.sampled_from([1, 2, 4]),
       rows=st.integers(1, 6), out_blocks=st.integers(1, 4), in_blocks=st.integers(1, 4),
       density=st.sampled_from([0.0, 0.2, 0.5, 1.0]), bias=st.booleans(),
       seed=st.integers(0, 999))
def test_fast_equals_reference_equals_dense(fmt, b, rows, out_blocks, in_blocks, density,
                                            bias, seed) -> None:
    torch.manual_seed(seed)
    b = b if fmt == "bsr" else 1
    out_f, in_f = out_blocks * b * 2, in_blocks * b * 2
    weight = sparse_weight(out_f, in_f, density, b)
    bias_t = torch.randn(out_f, dtype=torch.float64) if bias else None
    layer = SparseLinear.from_dense(weight, bias_t, fmt, b)
    x = torch.randn(rows, in_f, dtype=torch.float64)
    reference = (csr_linear_reference if fmt == "csr" else bsr_linear_reference)(
        x, *parts(layer), out_f)
    dense = F.linear(x, weight, bias_t)
    torch.testing.assert_close(layer(x), dense, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(reference, dense, rtol=1e-12, atol=1e-12)
    assert torch.equal(layer.dense_weight(), weight)


@pytest.mark.parametrize("fmt", ["csr", "bsr"])
def test_float32_matches_dense_to_rounding(fmt: str) -> None:
    weight = sparse_weight(64, 48, 0.3, 16 if fmt == "bsr" else 1, torch.float32)
    bias = torch.randn(64)
    layer = SparseLinear.from_dense(weight, bias, fmt, 16 if fmt == "bsr" else 1)
    x = torch.randn(2, 5, 48)  # leading dimensions are kept
    out = layer(x)
    assert out.shape == (2, 5, 64)
    # only the summation order differs: fp32 rounding of 48-term dot products
    torch.testing.assert_close(out, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("op", "b"), [(csr_linear, 1), (bsr_linear, 2)])
def test_gradcheck(op, b: int) -> None:
    fmt = "csr" if b == 1 else "bsr"
    layer = SparseLinear.from_dense(sparse_weight(4, 6, 0.6, b), torch.randn(4, dtype=torch.float64),
                                    fmt, b)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    values = layer.values.detach().clone().requires_grad_(True)
    bias = layer.bias.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x, v, c: op(x, layer.crow_indices, layer.col_indices, v, c, 4),
        (x, values, bias))


@pytest.mark.parametrize(("fmt", "b"), [("csr", 1), ("bsr", 4)])
def test_gradients_equal_the_dense_masked_layer(fmt: str, b: int) -> None:
    weight = sparse_weight(8, 12, 0.5, b)
    bias = torch.randn(8, dtype=torch.float64)
    layer = SparseLinear.from_dense(weight, bias, fmt, b)
    dense_w = weight.clone().requires_grad_(True)
    dense_b = bias.clone().requires_grad_(True)
    x1 = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    target = torch.randn(5, 8, dtype=torch.float64)
    (layer(x1) * target).sum().backward()
    (F.linear(x2, dense_w, dense_b) * target).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(layer.bias.grad, dense_b.grad)
    # the values' gradient is the dense weight gradient at the stored positions (for BSR:
    # every position of a kept tile, zeros inside it included), and nothing elsewhere
    stored = scatter(layer, torch.ones_like(layer.values)) != 0
    torch.testing.assert_close(scatter(layer, layer.values.grad), dense_w.grad * stored)


def test_empty_and_full_weights() -> None:
    for weight in (torch.zeros(6, 4, dtype=torch.float64),
                   torch.randn(6, 4, dtype=torch.float64)):
        for fmt, b in (("csr", 1), ("bsr", 2)):
            layer = SparseLinear.from_dense(weight, None, fmt, b)
            x = torch.randn(3, 4, dtype=torch.float64)
            torch.testing.assert_close(layer(x), x @ weight.T)


def test_cost_counts_kept_weights_and_tiles() -> None:
    weight = sparse_weight(32, 16, 0.25, 1, torch.float32)
    csr = SparseLinear.from_dense(weight, torch.zeros(32))
    x = torch.randn(7, 16)
    report = count(csr, x)
    kept = int((weight != 0).sum())
    assert report.macs == 7 * kept
    assert report.flops == 2 * 7 * kept + 7 * 32
    tiled = sparse_weight(32, 16, 0.5, 8, torch.float32)
    bsr = SparseLinear.from_dense(tiled, None, "bsr", 8)
    tiles = int((tiled != 0).reshape(4, 8, 2, 8).any(3).any(1).sum())
    assert count(bsr, x).macs == 7 * tiles * 64
    assert not count(bsr, x).uncounted


# --------------------------------------------------------------------------- transform
def model() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32), nn.GELU(),
                         nn.Linear(32, 8))


@pytest.mark.parametrize(("fmt", "prune"), [
    ("csr", lambda m: prune_magnitude(m, ratio=0.8, scope="global")),
    ("csr", lambda m: prune_nm(m, n=2, m=4)),
    ("bsr", lambda m: prune_block(m, ratio=0.75, block_size=8)),
])
def test_make_sparse_equals_the_masked_model(fmt: str, prune) -> None:
    masked, _ = prune(model())
    x = torch.randn(4, 3, 32)
    # 50-80% sparse: below the break-even, so force the conversion this test is about
    sparse, change = make_sparse(masked, format=fmt, block_size=8, example_inputs=(x,),
                                 force=True)
    assert change.replaced == ["0", "2", "4"]
    assert all(isinstance(sparse.get_submodule(p), SparseLinear) for p in change.replaced)
    torch.testing.assert_close(sparse(x), masked(x), rtol=1e-5, atol=1e-5)
    kept = sum(int((masked.get_submodule(p).weight != 0).sum()) for p in ("0", "2", "4"))
    assert change.after.macs == 12 * kept  # 12 rows of input, every kept weight once
    assert change.before.macs == 12 * (32 * 64 + 64 * 32 + 32 * 8)
    assert change.after.params < change.before.params
    assert isinstance(masked[0], nn.Linear)  # the caller's model is untouched


def test_make_sparse_float64_is_exact_to_rounding_and_roundtrips(tmp_path) -> None:
    masked, _ = prune_magnitude(model().double(), ratio=0.9)
    sparse, _ = make_sparse(masked)
    x = torch.randn(5, 32, dtype=torch.float64)
    torch.testing.assert_close(sparse(x), masked(x), rtol=1e-12, atol=1e-12)
    loaded = leantorch.load(leantorch.save(sparse, tmp_path / "sparse.safetensors"))
    assert isinstance(loaded[0], SparseLinear)
    a, b = sparse.state_dict(), loaded.state_dict()
    assert list(a) == list(b)
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(loaded(x), sparse(x))


def test_min_sparsity_and_skips() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(16, 12), nn.ReLU(),
                        nn.Linear(12, 8))
    masked, _ = prune_magnitude(net, ratio=0.9, include="4")
    _, change = make_sparse(masked, min_sparsity=0.5)
    assert change.replaced == ["4"]
    assert "below min_sparsity" in change.skipped["2"]
    assert "convolutions" in change.skipped["0"]
    _, change = make_sparse(masked, format="bsr", block_size=8)
    assert "not a multiple of block_size=8" in change.skipped["2"]
    with pytest.raises(LeanError, match="format must be one of"):
        make_sparse(masked, format="coo")
    with pytest.raises(LeanError, match="single layer"):
        make_sparse(nn.Linear(4, 4))
    with pytest.raises(LeanError, match="float32 or float64"):
        SparseLinear.from_dense(torch.zeros(4, 4, dtype=torch.bfloat16))
    assert get_transform("prune.make_sparse") is make_sparse


def test_the_default_threshold_is_the_measured_break_even_and_force_converts() -> None:
    assert BREAK_EVEN_SPARSITY == {"csr": 0.85, "bsr": 0.80}
    net = nn.Sequential(nn.Linear(20, 10), nn.ReLU(), nn.Linear(10, 20))
    with torch.no_grad():  # 200 weights each: 172 zeros (0.86 sparse) and 168 (0.84)
        for layer, zeros in ((net[0], 172), (net[2], 168)):
            flat = layer.weight.view(-1)
            flat[torch.randperm(200, generator=torch.Generator().manual_seed(0))[:zeros]] = 0
    _, change = make_sparse(net)
    assert change.replaced == ["0"] and change.params["min_sparsity"] == 0.85
    reason = change.skipped["2"]
    assert "sparsity 0.840 below min_sparsity=0.85" in reason and "break-even" in reason
    assert "force=True converts anyway" in reason
    forced, change = make_sparse(net, force=True)
    assert change.replaced == ["0", "2"] and isinstance(forced[2], SparseLinear)
    _, change = make_sparse(net, min_sparsity=0.8)  # the caller's own threshold
    assert change.replaced == ["0", "2"]
    with pytest.raises(LeanError, match=r"force=True converts whatever the sparsity, so "
                                        r"min_sparsity=0.5 would not apply"):
        make_sparse(net, force=True, min_sparsity=0.5)
    with pytest.raises(LeanError, match=r"prune.make_sparse: min_sparsity=1.5; expected a "
                                        r"number in \[0, 1\]"):
        make_sparse(net, min_sparsity=1.5)


def test_gpt2_conv1d_layers_run_sparse_and_roundtrip(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64,
                                     n_positions=32, bos_token_id=0, eos_token_id=0)
    gpt2 = transformers.GPT2LMHeadModel(config).eval()
    masked, _ = prune_magnitude(gpt2, ratio=0.7)
    sparse, change = make_sparse(masked, force=True)
    assert len(change.replaced) == 8 and "lm_head" in change.skipped
    ids = torch.randint(0, 64, (2, 9))
    torch.testing.assert_close(sparse(ids).logits, masked(ids).logits, rtol=1e-4, atol=1e-5)
    loaded = leantorch.load(leantorch.save(sparse, tmp_path / "gpt2.safetensors"))
    assert isinstance(loaded.transformer.h[0].attn.c_attn, SparseLinear)
    assert torch.equal(loaded(ids).logits, sparse(ids).logits)
