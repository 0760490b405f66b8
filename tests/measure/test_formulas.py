"""Counted FLOPs and MACs equal the hand formulas, op by op."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from leantorch.errors import LeanError
from leantorch.measure import Cost, attention_pairs, register_formula
from leantorch.measure.formulas import get_formula, op_name, tensor_bytes
from tests.conftest import count


class Fn(nn.Module):
    """Wrap a function as a module so profile() can run it."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


# --------------------------------------------------------------------------- Linear
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(7, 24), (2, 5, 24), (24,)])
def test_linear_matches_hand_formula(bias: bool, shape: tuple[int, ...]) -> None:
    layer = nn.Linear(24, 10, bias=bias)
    x = torch.randn(shape)
    rows = math.prod(shape[:-1])
    report = count(layer, x)
    assert report.macs == rows * 24 * 10
    assert report.flops == 2 * rows * 24 * 10 + (rows * 10 if bias else 0)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 9), n_in=st.integers(1, 17), n_out=st.integers(1, 17))
def test_linear_property(rows: int, n_in: int, n_out: int) -> None:
    report = count(nn.Linear(n_in, n_out), torch.randn(rows, n_in))
    assert report.macs == rows * n_in * n_out
    assert report.forward.other_flops == rows * n_out  # the bias add


def test_matmul_family() -> None:
    a, b = torch.randn(3, 4, 5), torch.randn(3, 5, 6)
    assert count(Fn(torch.bmm), a, b).macs == 3 * 4 * 5 * 6
    assert count(Fn(torch.mm), a[0], b[0]).macs == 4 * 5 * 6
    bias = torch.randn(3, 4, 6)
    report = count(Fn(lambda c, x, y: torch.baddbmm(c, x, y, beta=0.5)), bias, a, b)
    assert report.macs == 3 * 4 * 5 * 6
    assert report.forward.other_flops == 2 * 3 * 4 * 6  # add + scaling by beta
    v = torch.randn(5)
    assert count(Fn(torch.mv), a[0], v).macs == 4 * 5
    assert count(Fn(torch.dot), v, v).macs == 5
    # einsum and matmul decompose into bmm/mm: counted through them
    assert count(Fn(lambda x, y: torch.einsum("bij,bjk->bik", x, y)), a, b).macs == 3 * 4 * 5 * 6


# --------------------------------------------------------------------------- convolution
def conv_hand_macs(n, c_in, c_out, groups, kernel, out_spatial):
    return n * c_out * math.prod(out_spatial) * (c_in // groups) * math.prod(kernel)


@pytest.mark.parametrize(
    "c_in,c_out,k,stride,padding,dilation,groups",
    [
        (4, 8, 3, 1, 1, 1, 1),  # dense
        (4, 8, 3, 2, 0, 1, 1),  # strided
        (4, 8, 3, 1, 2, 2, 1),  # dilated
        (4, 8, 3, 1, 1, 1, 2),  # grouped
        (8, 8, 5, 1, 2, 1, 8),  # depthwise
        (6, 12, (1, 3), 1, 0, 1, 3),  # rectangular kernel, grouped
    ],
)
def test_conv2d_matches_hand_formula(c_in, c_out, k, stride, padding, dilation, groups) -> None:
    conv = nn.Conv2d(c_in, c_out, k, stride=stride, padding=padding, dilation=dilation,
                     groups=groups)
    x = torch.randn(2, c_in, 11, 13)
    out = conv(x)
    kernel = (k, k) if isinstance(k, int) else k
    macs = conv_hand_macs(2, c_in, c_out, groups, kernel, out.shape[2:])
    report = count(conv, x)
    assert report.macs == macs
    assert report.flops == 2 * macs + out.numel()  # + one bias add per output element


@pytest.mark.parametrize("groups,stride,dilation", [(1, 1, 1), (2, 2, 1), (4, 1, 3)])
def test_conv1d_matches_hand_formula(groups: int, stride: int, dilation: int) -> None:
    conv = nn.Conv1d(8, 12, 3, stride=stride, dilation=dilation, groups=groups, bias=False)
    x = torch.randn(3, 8, 40)
    out = conv(x)
    report = count(conv, x)
    assert report.macs == conv_hand_macs(3, 8, 12, groups, (3,), out.shape[2:])
    assert report.flops == 2 * report.macs


@pytest.mark.parametrize("groups", [1, 2])
def test_transposed_conv_counts_scattered_inputs(groups: int) -> None:
    conv = nn.ConvTranspose2d(4, 6, 3, stride=2, groups=groups, bias=False)
    x = torch.randn(2, 4, 5, 5)
    # every input element meets C_out / groups * k * k weights
    assert count(conv, x).macs == 2 * 4 * 5 * 5 * (6 // groups) * 9


# --------------------------------------------------------------------------- attention
@settings(max_examples=60, deadline=None)
@given(q_len=st.integers(1, 40), k_len=st.integers(1, 40))
def test_causal_pairs_are_what_the_mask_keeps(q_len: int, k_len: int) -> None:
    top_left = torch.ones(q_len, k_len, dtype=torch.bool).tril()
    bottom_right = torch.ones(q_len, k_len, dtype=torch.bool).tril(diagonal=k_len - q_len)
    assert attention_pairs(q_len, k_len, causal=True) == int(top_left.sum())
    assert attention_pairs(q_len, k_len, True, bottom_right=True) == int(bottom_right.sum())
    assert attention_pairs(q_len, k_len, causal=False) == q_len * k_len


def test_kernel_level_attention_ops_read_their_own_layouts() -> None:
    # _flash_attention_forward takes (batch, seq, heads, dim), or a packed variable-length
    # batch (total, heads, dim) with offsets; _efficient_attention_forward names them cu_seqlens.
    from leantorch.measure.formulas import OpCall

    aten = torch.ops.aten
    heads, d = 8, 64
    packed = torch.empty(256, heads, d, device="meta")
    offsets = torch.tensor([0, 100, 256])
    two_sequences = heads * (100 * 100 + 156 * 156) * 2 * d
    call = OpCall(aten._flash_attention_forward.default,
                  (packed, packed, packed, offsets, offsets, 156, 156, 0.0, False, False), {}, None)
    assert get_formula(call.func)(call).macs == two_sequences
    batched = torch.empty(1, 256, heads, d, device="meta")
    call = OpCall(aten._efficient_attention_forward.default,
                  (batched, batched, batched, None, offsets.int(), offsets.int(), 156, 156, 0.0, 0),
                  {}, None)
    assert get_formula(call.func)(call).macs == two_sequences
    dense = torch.empty(2, 50, heads, d, device="meta")  # bottom-right causal, square: n(n+1)/2
    call = OpCall(aten._efficient_attention_forward.default,
                  (dense, dense, dense, None, None, None, 50, 50, 0.0, 2), {}, None)
    assert get_formula(call.func)(call).macs == 2 * heads * (50 * 51 // 2) * 2 * d


def test_fused_addmm_activation_counts_its_activation() -> None:
    bias, x, w = torch.randn(32), torch.randn(8, 16), torch.randn(16, 32)
    gelu = count(Fn(lambda b, x, w: torch.ops.aten._addmm_activation(b, x, w, use_gelu=True)),
                 bias, x, w)
    relu = count(Fn(lambda b, x, w: torch.ops.aten._addmm_activation(b, x, w)), bias, x, w)
    assert gelu.macs == relu.macs == 8 * 16 * 32
    assert gelu.flops == 2 * 8 * 16 * 32 + 8 * 32 + 5 * 8 * 32
    assert relu.flops == 2 * 8 * 16 * 32 + 8 * 32 + 8 * 32


def sdpa_hand(batch, heads, q_len, k_len, d, dv, causal=False, masked=False):
    pairs = batch * heads * attention_pairs(q_len, k_len, causal)
    macs = pairs * (d + dv)
    return macs, 2 * macs + pairs * (6 + masked)  # scale + softmax (5) per score, + mask add


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("q_len,k_len", [(16, 16), (7, 12), (12, 7)])
def test_sdpa_matches_hand_formula(causal: bool, q_len: int, k_len: int) -> None:
    q = torch.randn(2, 3, q_len, 8)
    k, v = torch.randn(2, 3, k_len, 8), torch.randn(2, 3, k_len, 8)
    report = count(Fn(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)),
                   q, k, v)
    assert next(iter(report.ops)) == "aten._scaled_dot_product_flash_attention_for_cpu"
    macs, flops = sdpa_hand(2, 3, q_len, k_len, 8, 8, causal)
    assert report.macs == macs
    assert report.flops == flops


def test_sdpa_on_the_math_path_counts_the_full_matrix_it_computes() -> None:
    # A value head size unlike the query's keeps CPU SDPA off its fused kernel: the math path
    # computes every score and masks afterwards, so causal costs as much as non-causal.
    q, k, v = torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 4)
    causal = count(Fn(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
                   q, k, v)
    assert "aten._scaled_dot_product_flash_attention_for_cpu" not in causal.ops
    assert causal.macs == 2 * 9 * 9 * (8 + 4)


def test_causal_attention_counts_about_half() -> None:
    q = k = v = torch.randn(1, 2, 64, 16)
    full = count(Fn(lambda q, k, v: F.scaled_dot_product_attention(q, k, v)), q, k, v)
    causal = count(Fn(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
                   q, k, v)
    assert causal.macs / full.macs == pytest.approx((64 + 1) / (2 * 64))


def test_sdpa_with_mask_and_grouped_kv_heads() -> None:
    q, k, v = torch.randn(2, 8, 10, 16), torch.randn(2, 2, 10, 16), torch.randn(2, 2, 10, 16)
    mask = torch.rand(10, 10) > 0.3
    report = count(Fn(lambda q, k, v, m: F.scaled_dot_product_attention(
        q, k, v, attn_mask=m, enable_gqa=True)), q, k, v, mask)
    macs, flops = sdpa_hand(2, 8, 10, 10, 16, 16, masked=True)
    assert report.macs == macs  # every query head attends: KV sharing saves memory, not FLOPs
    # the boolean mask is first turned into an additive one (aten.where: one op per element)
    assert report.flops == flops + mask.numel()


def test_sdpa_with_dropout_counts_the_math_path_it_runs() -> None:
    q = k = v = torch.randn(1, 2, 6, 4)
    report = count(Fn(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)),
                   q, k, v)
    # dropout sends SDPA to the decomposed math kernel: two bmm over every pair
    assert report.ops["aten.bmm"]["macs"] == 2 * (2 * 6 * 6 * 4)
    assert "aten._safe_softmax" in report.ops
    assert report.macs == 2 * 2 * 6 * 6 * 4


# --------------------------------------------------------------------------- norms & softmax
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_matches_hand_formula(affine: bool) -> None:
    x = torch.randn(3, 5, 16)
    report = count(nn.LayerNorm(16, elementwise_affine=affine), x)
    assert report.flops == (5 + (2 if affine else 0)) * x.numel()
    assert report.macs == 0


def test_norms_and_softmax() -> None:
    x = torch.randn(2, 4, 3, 3)
    assert count(nn.GroupNorm(2, 4), x).flops == 7 * x.numel()
    assert count(nn.BatchNorm2d(4).eval(), x).flops == 4 * x.numel()
    assert count(nn.BatchNorm2d(4, affine=False).eval(), x).flops == 2 * x.numel()
    assert count(nn.BatchNorm2d(4).train(), x).flops == 8 * x.numel()  # + batch statistics
    assert count(nn.Softmax(dim=-1), x).flops == 5 * x.numel()
    assert count(nn.LogSoftmax(dim=1), x).flops == 5 * x.numel()


def test_elementwise_and_reductions() -> None:
    a, b = torch.randn(4, 6), torch.randn(6)
    assert count(Fn(torch.add), a, b).flops == 24  # broadcast: one add per output element
    assert count(nn.GELU(), a).flops == 5 * 24
    assert count(nn.GELU(approximate="tanh"), a).flops == 9 * 24
    assert count(nn.SiLU(), a).flops == 4 * 24
    assert count(nn.ReLU(), a).flops == 24
    assert count(Fn(lambda x: x.sum(dim=1)), a).flops == 24 - 4  # n - 1 adds per row
    assert count(Fn(lambda x: x.mean(dim=0)), a).flops == 24
    ints = torch.arange(24).reshape(4, 6)
    assert count(Fn(lambda x: x + 1), ints).flops == 0  # index arithmetic is not floating point


def test_embedding_reads_only_the_rows_it_looks_up() -> None:
    table = nn.Embedding(1000, 32)
    ids = torch.tensor([[1, 2, 3, 4]])
    report = count(table, ids)
    assert report.flops == 0
    rows = 4 * 32 * 4
    assert report.forward.bytes_read == ids.numel() * 8 + rows
    assert report.forward.weight_bytes_read == rows  # not the whole 128 KB table
    assert report.forward.bytes_written == rows


def test_views_cost_nothing_and_copies_cost_bytes() -> None:
    x = torch.randn(8, 8)
    views = count(Fn(lambda x: x.reshape(64)[:10].unsqueeze(0).transpose(0, 1)), x)
    assert views.flops == 0 and views.forward.bytes == 0 and not views.uncounted
    assert views.forward.ops == 4
    # reshaping a transposed tensor has to copy it: read 256 bytes, write 256 bytes
    copy = count(Fn(lambda x: x.t().reshape(64)), x)
    assert copy.flops == 0
    assert copy.forward.bytes == 2 * x.numel() * 4


def test_tensor_bytes_counts_broadcast_dims_once() -> None:
    row = torch.randn(1, 16)
    assert tensor_bytes(row.expand(100, 16)) == 16 * 4
    assert tensor_bytes(torch.randn(3, 4)[:, :2]) == 6 * 4


# --------------------------------------------------------------------------- register_formula
@torch.library.custom_op("leantorch_test::scaled_sum", mutates_args=())
def scaled_sum(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x + y) * 2


@scaled_sum.register_fake
def _(x, y):
    return torch.empty_like(x)


def test_custom_op_is_uncounted_until_it_has_a_formula() -> None:
    op = torch.ops.leantorch_test.scaled_sum
    x = torch.randn(5, 7)
    before = count(Fn(scaled_sum), x, x)
    assert before.flops == 0
    assert before.uncounted["leantorch_test.scaled_sum"]["calls"] == 1
    assert before.uncounted["leantorch_test.scaled_sum"]["reason"] == "no formula"
    try:
        register_formula(op, lambda call: Cost(flops=2 * call.output.numel()))
        after = count(Fn(scaled_sum), x, x)
        assert after.flops == 2 * 35
        assert not after.uncounted
    finally:
        from leantorch.measure.formulas import _REGISTRY

        _REGISTRY.pop(op, None)


def test_register_formula_by_name_and_as_decorator() -> None:
    from leantorch.measure.formulas import _REGISTRY

    @register_formula("leantorch_test::scaled_sum.default")
    def formula(call):
        return 3 * call.output.numel()  # an int means FLOPs

    try:
        assert get_formula(torch.ops.leantorch_test.scaled_sum.default) is formula
        x = torch.randn(4)
        assert count(Fn(scaled_sum), x, x).flops == 12
    finally:
        _REGISTRY.pop(torch.ops.leantorch_test.scaled_sum.default, None)


def test_a_formula_that_fails_is_reported_not_zeroed() -> None:
    from leantorch.measure.formulas import _REGISTRY

    op = torch.ops.leantorch_test.scaled_sum
    register_formula(op, lambda call: call.arg("missing").numel())
    try:
        report = count(Fn(scaled_sum), torch.randn(3), torch.randn(3))
        entry = report.uncounted["leantorch_test.scaled_sum"]
        assert entry["reason"].startswith("formula failed")
    finally:
        _REGISTRY.pop(op, None)


def test_register_formula_rejects_bad_arguments() -> None:
    with pytest.raises(LeanError, match="not a registered torch op"):
        register_formula("nosuchns::nosuchop", lambda call: 0)
    with pytest.raises(LeanError, match="must be a torch op"):
        register_formula(42, lambda call: 0)
    with pytest.raises(LeanError, match="must be callable"):
        register_formula(torch.ops.aten.mm, "not callable")


def test_cost_validation() -> None:
    assert Cost(macs=3).flops == 6
    assert Cost(flops=10, macs=3).flops == 10
    with pytest.raises(LeanError, match="must include the 2 FLOPs of every MAC"):
        Cost(flops=5, macs=3)
    with pytest.raises(LeanError, match=">= 0"):
        Cost(flops=-1)


def test_op_names() -> None:
    assert op_name(torch.ops.aten.mm.default) == "aten.mm"
    assert op_name(torch.ops.aten.select_backward) == "aten.select_backward"


@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_fp16_decode_attention_intensity_is_the_gqa_group_size(group: int) -> None:
    # One query token against L cached keys: each KV head's 4*L*d bytes (K and V in fp16)
    # serve `group` query heads doing 4*L*d FLOPs each, so FLOP/B ~= group (TECHNIQUES.md).
    heads, length, d = 8, 1024, 128
    q = torch.randn(1, heads, 1, d, dtype=torch.float16)
    k, v = (torch.randn(1, heads // group, length, d, dtype=torch.float16) for _ in range(2))
    report = count(Fn(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)),
                   q, k, v)
    # exactly: (4d + 6) FLOPs per score over 4d bytes per cached key, plus the small tensors
    scores = heads * length
    kv_bytes = 2 * (heads // group) * length * d * 2
    other_bytes = 2 * heads * d * 2 + heads * 4  # q and out in fp16, the fp32 logsumexp
    assert report.forward.bytes == kv_bytes + other_bytes
    assert report.forward.intensity == pytest.approx(
        (4 * d + 6) * scores / (kv_bytes + other_bytes))
    assert report.forward.intensity == pytest.approx(group, rel=0.02)


def test_log_sigmoid_is_counted() -> None:
    x = torch.randn(3, 7)
    report = count(nn.LogSigmoid(), x)
    assert not report.uncounted and report.flops == 3 * 21  # exp, add, log
