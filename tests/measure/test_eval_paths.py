"""What ordinary PyTorch modules run in eval mode is counted too (issue 10, point 4).

nn.MultiheadAttention's inference fast path is one kernel (``aten._native_multi_head_attention``)
and the CPU LSTM is oneDNN's (``aten.mkldnn_rnn_layer`` and its backward). Each count is held to a
hand formula and to the same module's decomposed path, whose ops have their own tested formulas.
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from leantorch.measure.formulas import get_formula, is_view
from tests.conftest import count

MHA_OP = "aten._native_multi_head_attention"
LSTM_OP = "aten.mkldnn_rnn_layer"


@contextlib.contextmanager
def mha_fastpath(enabled: bool):
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(enabled)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


@contextlib.contextmanager
def onednn_disabled():
    """torch's decomposed RNN path; flipping the flag makes torch warn about TF32 on Intel GPUs."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")
        with torch.backends.mkldnn.flags(enabled=False):
            yield


# --------------------------------------------------------------------------- multi-head attention
class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, need_weights: bool, average: bool = True) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.need_weights, self.average = need_weights, average

    def forward(self, x, key_padding_mask=None, attn_mask=None):
        out, weights = self.attn(x, x, x, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                                 need_weights=self.need_weights,
                                 average_attn_weights=self.average)
        return out if weights is None else (out, weights)


def mha_hand_count(b: int, t: int, dim: int, heads: int, masked: bool, weights: bool):
    """(MACs, FLOPs) of the fast-path kernel, written out term by term."""
    d = dim // heads
    scores = b * heads * t * t
    macs = (3 * b * t * dim * dim  # q, k, v projections
            + scores * d  # Q K^T
            + scores * d  # P V
            + b * t * dim * dim)  # out-projection
    other = (3 * b * t * dim  # q, k, v bias
             + b * t * dim  # q * 1/sqrt(d)
             + 5 * scores + (scores if masked else 0)  # softmax, mask
             + b * t * dim  # out-projection bias
             + (scores if weights else 0))  # mean of the weights over heads
    return macs, 2 * macs + other


def masks(kind: str, b: int, t: int):
    kpm = attn = None
    if kind in ("key_padding", "both"):
        kpm = torch.zeros(b, t, dtype=torch.bool)
        kpm[0, t - 2:] = True
    if kind in ("causal", "both"):
        attn = torch.ones(t, t, dtype=torch.bool).triu(1)
    return kpm, attn


def mask_preparation_flops(kind: str, b: int, t: int, heads: int) -> int:
    """What nn.MultiheadAttention does to boolean masks before either path: each becomes a float
    mask (masked_fill, 1 per element); with both, they are added into one (B, H, T, T) mask."""
    return {"none": 0, "key_padding": b * t, "causal": t * t,
            "both": b * t + t * t + b * heads * t * t}[kind]


@pytest.mark.parametrize("mask", ["none", "key_padding", "causal", "both"])
@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("dim,heads", [(16, 4), (12, 2)])
def test_mha_fast_path_matches_hand_count(mask: str, need_weights: bool, dim: int,
                                          heads: int) -> None:
    b, t = 2, 5
    model = SelfAttention(dim, heads, need_weights).eval()
    x = torch.randn(b, t, dim)
    kpm, attn = masks(mask, b, t)
    report = count(model, x, kpm, attn)
    assert report.uncounted == {}
    assert report.ops[MHA_OP]["calls"] == 1  # the fast path ran
    macs, flops = mha_hand_count(b, t, dim, heads, mask != "none", need_weights)
    assert report.ops[MHA_OP]["macs"] == macs
    assert report.ops[MHA_OP]["flops"] == flops
    assert report.macs == macs
    assert report.flops == flops + mask_preparation_flops(mask, b, t, heads)


@pytest.mark.parametrize("mask", ["none", "key_padding", "causal", "both"])
@pytest.mark.parametrize("need_weights", [False, True])
def test_mha_fast_path_costs_what_the_decomposed_path_costs(mask: str, need_weights: bool) -> None:
    b, t, dim, heads = 2, 6, 16, 4
    model = SelfAttention(dim, heads, need_weights).eval()
    x = torch.randn(b, t, dim)
    kpm, attn = masks(mask, b, t)
    fast = count(model, x, kpm, attn)
    with mha_fastpath(False):
        slow = count(model, x, kpm, attn)
    assert MHA_OP in fast.ops and MHA_OP not in slow.ops
    assert fast.uncounted == slow.uncounted == {}
    assert fast.macs == slow.macs
    if need_weights:
        # the decomposed path runs the same algorithm: scale q, bmm, softmax, bmm, mean
        assert fast.flops == slow.flops
    else:
        # the decomposed path calls fused SDPA, which scales each score instead of each q element
        scores, q_elements = b * heads * t * t, b * t * dim
        assert slow.flops - fast.flops == scores - q_elements


def test_mha_with_grad_takes_the_decomposed_path_and_counts_the_same_macs() -> None:
    b, t, dim, heads = 2, 5, 16, 4
    model = SelfAttention(dim, heads, need_weights=True).eval()
    x = torch.randn(b, t, dim)
    no_grad = count(model, x)
    with_grad = count(model, x, backward=True)
    assert MHA_OP in no_grad.ops and MHA_OP not in with_grad.ops
    assert with_grad.uncounted == {}
    assert with_grad.forward.macs == no_grad.macs
    assert with_grad.forward.flops == no_grad.flops


def test_mha_unaveraged_weights_cost_no_mean() -> None:
    b, t, dim, heads = 2, 5, 16, 4
    model = SelfAttention(dim, heads, need_weights=True, average=False).eval()
    report = count(model, torch.randn(b, t, dim))
    assert report.ops[MHA_OP]["flops"] == mha_hand_count(b, t, dim, heads, False, False)[1]


def test_mha_op_called_directly_for_cross_attention() -> None:
    """The kernel also takes a key/value tensor other than the query (cross-attention; torch
    requires the same shape), projecting q from the query and k, v from the key."""
    b, t, s, dim, heads = 2, 3, 3, 8, 2
    mha = nn.MultiheadAttention(dim, heads, batch_first=True)
    q, kv = torch.randn(b, t, dim), torch.randn(b, s, dim)

    class Direct(nn.Module):
        def forward(self, q, kv):
            return torch.ops.aten._native_multi_head_attention(
                q, kv, kv, dim, heads, mha.in_proj_weight, mha.in_proj_bias,
                mha.out_proj.weight, mha.out_proj.bias, None, False)[0]

    with torch.no_grad():
        report = count(Direct(), q, kv)
        ref = mha(q, kv, kv, need_weights=False)[0]
        assert torch.allclose(Direct()(q, kv), ref, atol=1e-6)
    d = dim // heads
    macs = b * t * dim * dim + 2 * b * s * dim * dim + 2 * b * heads * t * s * d + b * t * dim * dim
    assert report.macs == macs
    assert report.flops == 2 * macs + (3 * b * t + 2 * b * s) * dim + 5 * b * heads * t * s


# --------------------------------------------------------------------------- recurrent layers
def rnn_hand_count(kind: str, t: int, b: int, i: int, h: int, layers: int, directions: int,
                   bias: bool, proj: int = 0):
    """(MACs, other FLOPs) of an RNN forward, per the documented cell counts."""
    gates = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}[kind]
    per_unit = {"lstm": 19, "gru": 14, "rnn_tanh": 2, "rnn_relu": 2}[kind] + 2 * gates * bias
    out = proj or h
    macs = other = 0
    for layer in range(layers):
        size_in = i if layer == 0 else out * directions
        per_token = gates * h * (size_in + out) + h * proj  # gate matmuls (+ the projection)
        macs += directions * t * b * per_token
        other += directions * t * b * h * per_unit
    return macs, other


def rnn_input(b: int, t: int, i: int, batch_first: bool) -> torch.Tensor:
    return torch.randn(b, t, i) if batch_first else torch.randn(t, b, i)


LSTM_SHAPES = [  # (layers, bidirectional, batch_first, bias)
    (1, False, True, True),
    (2, True, True, True),
    (2, False, False, False),
    (3, True, False, True),
]


@pytest.mark.parametrize("layers,bidirectional,batch_first,bias", LSTM_SHAPES)
def test_lstm_onednn_eval_matches_hand_count_and_decomposed_path(
        layers: int, bidirectional: bool, batch_first: bool, bias: bool) -> None:
    t, b, i, h = 5, 3, 7, 6
    lstm = nn.LSTM(i, h, num_layers=layers, bidirectional=bidirectional,
                   batch_first=batch_first, bias=bias).eval()
    x = rnn_input(b, t, i, batch_first)
    report = count(lstm, x)
    directions = 2 if bidirectional else 1
    assert report.uncounted == {}
    assert report.ops[LSTM_OP]["calls"] == layers * directions  # oneDNN ran every layer
    macs, other = rnn_hand_count("lstm", t, b, i, h, layers, directions, bias)
    assert report.macs == macs
    assert report.forward.other_flops == other
    with onednn_disabled():
        decomposed = count(lstm, x)
    assert LSTM_OP not in decomposed.ops and decomposed.uncounted == {}
    assert (decomposed.macs, decomposed.flops) == (report.macs, report.flops)


class Recurrent(nn.Module):
    """An RNN whose input and initial state are parameters, so backward computes every gradient
    the fused kernel does (input, initial state, weights). The ``* 1`` keeps the tensors handed
    to the RNN non-leaf."""

    def __init__(self, rnn: nn.RNNBase, x: torch.Tensor) -> None:
        super().__init__()
        self.rnn = rnn
        self.x = nn.Parameter(x)
        layers = rnn.num_layers * (2 if rnn.bidirectional else 1)
        shape = (layers, x.shape[0 if rnn.batch_first else 1], rnn.hidden_size)
        self.h0 = nn.Parameter(torch.randn(shape))
        self.c0 = nn.Parameter(torch.randn(shape)) if isinstance(rnn, nn.LSTM) else None

    def forward(self):
        state = self.h0 * 1 if self.c0 is None else (self.h0 * 1, self.c0 * 1)
        return self.rnn(self.x * 1, state)[0]


@pytest.mark.parametrize("layers,bidirectional,batch_first,bias", LSTM_SHAPES)
def test_lstm_onednn_backward(layers: int, bidirectional: bool, batch_first: bool,
                              bias: bool) -> None:
    t, b, i, h = 4, 2, 5, 3
    lstm = nn.LSTM(i, h, num_layers=layers, bidirectional=bidirectional,
                   batch_first=batch_first, bias=bias)
    model = Recurrent(lstm, rnn_input(b, t, i, batch_first))
    report = count(model, backward=True)
    directions = 2 if bidirectional else 1
    assert report.uncounted == {}
    assert report.ops["aten.mkldnn_rnn_layer_backward"]["calls"] == layers * directions
    macs, _ = rnn_hand_count("lstm", t, b, i, h, layers, directions, bias)
    assert report.forward.macs == macs
    assert report.backward.macs == 2 * macs  # input/state gradient + weight gradient
    # the kernel's own FLOPs (autograd adds the gradients of a tensor used twice with `add`,
    # counted apart: the input of a bidirectional layer feeds both directions)
    units = t * b * h * layers * directions
    kernel = report.ops["aten.mkldnn_rnn_layer_backward"]
    assert kernel["flops"] == 2 * kernel["macs"] + (23 + 8 * bias) * units
    # eval without grad counts the same forward as training with grad
    with torch.no_grad():
        assert count(model).forward.flops == report.forward.flops
    # the decomposed path's autograd computes the same gradients: the same MACs
    with onednn_disabled():
        decomposed = count(model, backward=True)
    assert "aten.mkldnn_rnn_layer_backward" not in decomposed.ops
    assert decomposed.backward.macs == report.backward.macs
    assert decomposed.forward.flops == report.forward.flops


def test_lstm_with_projection_and_packed_sequences_take_the_decomposed_path() -> None:
    t, b, i, h, p = 4, 3, 5, 6, 2
    lstm = nn.LSTM(i, h, proj_size=p, num_layers=2).eval()
    x = torch.randn(t, b, i)
    with pytest.warns(UserWarning, match="projections"):  # torch says oneDNN cannot run it
        report = count(lstm, x)
    assert report.uncounted == {} and LSTM_OP not in report.ops
    macs, other = rnn_hand_count("lstm", t, b, i, h, 2, 1, True, proj=p)
    assert (report.macs, report.forward.other_flops) == (macs, other)

    lengths = [4, 3, 1]
    lstm = nn.LSTM(i, h).eval()
    padded = torch.randn(b, t, i)
    packed = nn.utils.rnn.pack_padded_sequence(padded, lengths, batch_first=True)

    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = lstm

        def forward(self, data):
            return self.lstm(nn.utils.rnn.PackedSequence(data, packed.batch_sizes))[0].data

    report = count(Packed(), packed.data)
    assert report.uncounted == {}
    tokens = sum(lengths)  # padding costs nothing: only real steps run
    assert report.macs == tokens * 4 * h * (i + h)
    assert report.forward.other_flops == tokens * h * (19 + 8)


@pytest.mark.parametrize("kind", ["gru", "rnn_tanh", "rnn_relu"])
@pytest.mark.parametrize("layers,bidirectional,batch_first,bias", LSTM_SHAPES[:3])
def test_gru_and_rnn_count_every_path(kind: str, layers: int, bidirectional: bool,
                                      batch_first: bool, bias: bool) -> None:
    t, b, i, h = 4, 3, 5, 6
    options = dict(num_layers=layers, bidirectional=bidirectional, batch_first=batch_first,
                   bias=bias)
    if kind == "gru":
        rnn = nn.GRU(i, h, **options)
    else:
        rnn = nn.RNN(i, h, nonlinearity=kind.removeprefix("rnn_"), **options)
    rnn.eval()
    x = rnn_input(b, t, i, batch_first)
    directions = 2 if bidirectional else 1
    macs, other = rnn_hand_count(kind, t, b, i, h, layers, directions, bias)
    report = count(rnn, x)
    assert report.uncounted == {}  # unsafe_split and transpose_ included
    assert (report.macs, report.forward.other_flops) == (macs, other)
    model = Recurrent(rnn, x)
    trained = count(model, backward=True)
    assert trained.uncounted == {}
    assert trained.forward.macs == macs
    assert trained.backward.macs == 2 * macs  # every gradient asked for


# --------------------------------------------------------------------------- views
def test_in_place_views_cost_nothing() -> None:
    def fn(x):
        y = x.clone()  # the only op that moves data
        y.transpose_(0, 1)
        y.t_()
        y.unsqueeze_(0)
        y.squeeze_(0)
        y.as_strided_((4, 6), (6, 1))
        parts = y.unsafe_split(2) + y.unsafe_split_with_sizes([1, 3]) + y.unsafe_chunk(2)
        return torch.stack([p.sum() for p in parts])

    class Fn(nn.Module):
        def forward(self, x):
            return fn(x)

    report = count(Fn(), torch.randn(4, 6))
    assert report.uncounted == {}
    for name in ("aten.transpose_", "aten.t_", "aten.unsqueeze_", "aten.squeeze_",
                 "aten.as_strided_", "aten.unsafe_split", "aten.unsafe_split_with_sizes"):
        assert report.ops[name]["calls"] >= 1, name
        assert (report.ops[name]["flops"], report.ops[name]["bytes"]) == (0, 0), name
    # the clone reads and writes 24 floats; the six sums are all the arithmetic
    assert report.ops["aten.clone"]["bytes"] == 2 * 24 * 4
    assert report.flops == 2 * (12 - 1) + (6 - 1) + (18 - 1) + 2 * (12 - 1)


# Ops that return an alias of an input, that reach a dispatch mode (not CompositeImplicitAutograd)
# and that have no formula on purpose. Each stays listed under `uncounted` if it ever runs.
ALIAS_EXCEPTIONS = {
    # AMP loss-scale bookkeeping on one-element tensors; GradScaler.update runs it outside any
    # model's forward or backward, so a profile does not meet it.
    "aten._amp_update_scale_",
    # sparse COO and oneDNN-layout tensors have no strides: leantorch counts strided tensors only.
    "aten._coalesced_",
    "aten.copy_sparse_to_sparse_",
    "aten.resize_as_sparse_",
    "aten.sparse_resize_",
    "aten.sparse_resize_and_clear_",
    "aten._mkldnn_transpose_",
}


def aten_overloads():
    for qualified in torch._C._dispatch_get_all_op_names():
        if not qualified.startswith("aten::"):
            continue
        name, _, overload = qualified[len("aten::"):].partition(".")
        yield getattr(getattr(torch.ops.aten, name), overload or "default")


def test_every_op_returning_an_alias_is_costed_or_excepted() -> None:
    """Views cost nothing through the counter's `is_view` rule; in-place ops (whose result is
    their written input) need a formula; CompositeImplicitAutograd ops never reach the counter
    (their decomposition does); `out=` overloads share their functional op's formula, a question
    for that op. Whatever is left is an explicit exception."""
    missing, stale = [], set(ALIAS_EXCEPTIONS)
    for op in aten_overloads():
        schema = op._schema
        if not any(r.alias_info is not None for r in schema.returns):
            continue
        if any(a.kwarg_only and a.alias_info is not None and a.alias_info.is_write
               for a in schema.arguments):
            continue  # an out= overload
        name = f"aten.{op.overloadpacket.__name__}"
        if is_view(op) or get_formula(op) is not None:
            continue
        if torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CompositeImplicitAutograd"):
            continue
        if name in ALIAS_EXCEPTIONS:
            stale.discard(name)
            continue
        missing.append(str(op))
    assert missing == [], f"ops returning an alias with no formula: {missing}"
    assert stale == set(), f"exceptions that no longer apply: {stale}"


def test_views_whose_schema_hides_the_alias_cost_nothing() -> None:
    for op in (torch.ops.aten.unsafe_split.Tensor, torch.ops.aten.unsafe_split_with_sizes.default,
               torch.ops.aten.transpose_.default, torch.ops.aten.t_.default):
        assert not is_view(op)  # so they need their own formula
        assert get_formula(op) is not None


def test_special_functions_and_rare_in_place_ops() -> None:
    from tests.measure.test_formulas import Fn

    x = torch.rand(3, 4) + 0.5
    assert count(Fn(torch.lgamma), x).flops == 12
    assert count(Fn(torch.sinc), x).flops == 3 * 12
    assert count(Fn(lambda v: torch.mvlgamma(v + 2, p=3)), x).flops == 12 + 3 * 3 * 12
    assert count(Fn(lambda v: v.clone().lgamma_()), x).uncounted == {}
    index = torch.tensor([0, 5, 5])
    source = torch.ones(3)
    report = count(Fn(lambda v: v.clone().put_(index, source, accumulate=True)), x)
    assert report.ops["aten.put_"]["flops"] == 3
    report = count(Fn(lambda v: torch.renorm(v, 2, 0, 1.0)), x)
    assert report.flops == 3 * 12 + 2 * 3
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[:, -1] = True
    report = count(Fn(lambda v: torch._masked_softmax(v, mask, 1)), x)
    assert report.flops == 6 * 12  # softmax 5 + the mask 1, per element
    z = torch.randn(3, 4, dtype=torch.complex64)
    assert count(Fn(lambda v: v.clone().conj_physical_()), z).flops == 12
    assert count(Fn(lambda v: v.clone().conj_physical_()), x).flops == 0  # real: a copy


def test_embedding_with_max_norm_renormalises_only_the_rows_it_looks_up() -> None:
    table = nn.Embedding(50, 8, max_norm=1.0)
    ids = torch.tensor([[1, 2, 2, 7]])
    report = count(table, ids)
    assert report.uncounted == {}
    rows = 3  # 1, 2, 7
    assert report.ops["aten.embedding_renorm_"]["flops"] == 3 * rows * 8 + 2 * rows
    row_bytes = rows * 8 * 4
    assert report.ops["aten.embedding_renorm_"]["bytes"] == ids.numel() * 8 + 2 * row_bytes


# --------------------------------------------------------------------------- the issue's model
class IssueModel(nn.Module):
    """The user model of issue 10: attention, then an LSTM, then a GRU, then a classifier."""

    def __init__(self, dim: int = 16, heads: int = 4, hidden: int = 12, classes: int = 5) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.lstm = nn.LSTM(dim, hidden, batch_first=True, bidirectional=True)
        self.gru = nn.GRU(2 * hidden, hidden, batch_first=True, num_layers=2)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        x = self.attn(x, x, x, need_weights=False)[0]
        x = self.lstm(x)[0]
        x = self.gru(x)[0]
        return self.head(F.relu(x[:, -1]))


def test_issue_model_in_eval_without_grad_is_fully_counted() -> None:
    b, t, dim, heads, hidden, classes = 2, 7, 16, 4, 12, 5
    model = IssueModel(dim, heads, hidden, classes).eval()
    report = count(model, torch.randn(b, t, dim))
    assert report.uncounted == {}
    assert MHA_OP in report.ops and LSTM_OP in report.ops
    attn = mha_hand_count(b, t, dim, heads, False, False)[0]
    lstm = 2 * t * b * 4 * hidden * (dim + hidden)
    gru = t * b * 3 * hidden * (2 * hidden + hidden) + t * b * 3 * hidden * (hidden + hidden)
    head = b * hidden * classes
    assert report.macs == attn + lstm + gru + head
    assert report.module("attn").forward.macs == attn
    assert report.module("lstm").forward.macs == lstm
    assert report.module("gru").forward.macs == gru
