"""leantorch.nn.moe.MoE: boundary cases, invariants, losses, MoE++ experts, executed costs and
serialization."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import leantorch
from leantorch.errors import LeanError
from leantorch.nn.moe import FeedForward, MoE, StackedExperts, moe_aux_loss
from leantorch.ops.moe.naive import kept_by_capacity_naive, moe_naive
from tests.conftest import count

FAST = settings(max_examples=15, deadline=None)
D, H = 8, 12


def _routing_of(layer: MoE, x: torch.Tensor):
    return layer.router.route(layer.router.logits(x.reshape(-1, layer.dim)))


def _copy_expert_into_all(layer: MoE, ffn: FeedForward) -> None:
    with torch.no_grad():
        layer.experts.w_in.copy_(ffn.w_in.expand_as(layer.experts.w_in))
        layer.experts.w_out.copy_(ffn.w_out.expand_as(layer.experts.w_out))
        if ffn.b_in is not None:
            layer.experts.b_in.copy_(ffn.b_in.expand_as(layer.experts.b_in))
            layer.experts.b_out.copy_(ffn.b_out.expand_as(layer.experts.b_out))


class _CountMatmuls(TorchDispatchMode):
    """Records the (rows, cols) of every mm output: which expert ran on how many rows."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket is torch.ops.aten.mm:  # mm and mm.out
            self.shapes.append(tuple(out.shape))
        return out


# --------------------------------------------------------------------------- boundary cases
@pytest.mark.parametrize("gated,activation,bias", [(True, "silu", False), (False, "gelu", True),
                                                   (True, "gelu", True), (False, "relu", False)])
def test_one_expert_top1_is_the_dense_ffn(gated, activation, bias) -> None:
    layer = MoE(D, H, 1, 1, activation=activation, gated=gated, bias=bias).double().eval()
    ffn = FeedForward(D, H, activation, gated, bias).double()
    _copy_expert_into_all(layer, ffn)
    x = torch.randn(3, 5, D, dtype=torch.float64)
    torch.testing.assert_close(layer(x), ffn(x), rtol=1e-13, atol=1e-13)


@FAST
@given(experts=st.integers(1, 5), score=st.sampled_from(["softmax", "sigmoid"]), data=st.data())
def test_identical_experts_give_the_ffn_under_any_router(experts, score, data) -> None:
    k = data.draw(st.integers(1, experts))
    layer = MoE(D, H, experts, k, score=score, gates="renorm").double().eval()
    with torch.no_grad():
        layer.router.weight.normal_(0, data.draw(st.sampled_from([0.1, 1.0, 10.0])))
    ffn = FeedForward(D, H).double()
    _copy_expert_into_all(layer, ffn)
    x = torch.randn(9, D, dtype=torch.float64)
    torch.testing.assert_close(layer(x), ffn(x), rtol=1e-12, atol=1e-12)


def test_only_the_chosen_experts_run() -> None:
    layer = MoE(D, H, 6, 1, backend="loop").eval()
    with torch.no_grad():  # route every token to expert 2 or 4 only
        layer.router.weight.zero_()
        layer.router.bias = None
        layer.router.weight[2, 0] = layer.router.weight[4, 1] = 10.0
    x = torch.zeros(7, D)
    x[:3, 0], x[3:, 1] = 1.0, 1.0
    with _CountMatmuls() as seen:
        layer(x)
    assert layer.stats.load.tolist() == [0, 0, 3, 0, 4, 0]
    # the router's mm, then the up and down projections of each expert that received
    # tokens, on exactly its rows
    assert seen.shapes == [(7, 6), (3, 2 * H), (3, D), (4, 2 * H), (4, D)]


def test_layer_matches_the_naive_loop_in_values_and_gradients() -> None:
    layer = MoE(D, H, 4, 2, bias=True, capacity_factor=0.75, backend="loop").double().train()
    x = torch.randn(10, D, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    probe = torch.randn(10, D, dtype=torch.float64)
    (layer(x) * probe).sum().backward()
    fast_grads = [p.grad.clone() for p in (layer.router.weight, layer.experts.w_in,
                                           layer.experts.w_out, layer.experts.b_in)]
    layer.zero_grad()
    routing = _routing_of(layer, x_ref)
    e = layer.experts
    capacity = 4  # ceil(0.75 * 2 * 10 / 4)
    ref = moe_naive(x_ref, routing.token_index, routing.expert_index, routing.gates, e.w_in,
                    e.w_out, e.b_in, e.b_out, capacity=capacity)
    (ref * probe).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    for fast, p in zip(fast_grads, (layer.router.weight, e.w_in, e.w_out, e.b_in), strict=True):
        torch.testing.assert_close(fast, p.grad)
    assert fast_grads[0].abs().sum() > 0  # the router learns through the gates


def test_gradcheck_of_the_whole_layer() -> None:
    layer = MoE(3, 4, 3, 2, shared_experts=1, copy_experts=1, constant_experts=1,
                backend="loop").double().eval()
    names = ["router.weight", "constant_w"]  # the experts' weights: see tests/ops/moe
    params = {n: p.detach().clone().requires_grad_() for n, p in layer.named_parameters()
              if n in names}

    def fn(x, *values):
        return torch.func.functional_call(layer, dict(zip(names, values, strict=True)), (x,))

    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (x, *(params[n] for n in names)))


# --------------------------------------------------------------------------- invariants
def test_outputs_are_permutation_equivariant_over_tokens() -> None:
    layer = MoE(D, H, 5, 2, shared_experts=1, zero_experts=1, copy_experts=1).double().eval()
    x = torch.randn(11, D, dtype=torch.float64)
    perm = torch.randperm(11)
    torch.testing.assert_close(layer(x)[perm], layer(x[perm]), rtol=1e-12, atol=1e-12)


def test_capacity_drops_exactly_the_over_capacity_assignments_in_priority_order() -> None:
    layer = MoE(D, H, 3, 2, capacity_factor=0.5, backend="loop").double().eval()
    x = torch.randn(12, D, dtype=torch.float64)
    out = layer(x)
    routing = _routing_of(layer, x)
    capacity = 4  # ceil(0.5 * 2 * 12 / 3)
    kept = kept_by_capacity_naive(routing.expert_index.tolist(), capacity)
    assert layer.stats.dropped == kept.count(False) > 0
    assert layer.stats.load.tolist() == [min(capacity, int(c)) for c in
                                         torch.bincount(routing.expert_index, minlength=3)]
    e = layer.experts
    ref = moe_naive(x, routing.token_index, routing.expert_index, routing.gates, e.w_in,
                    e.w_out, capacity=capacity)
    torch.testing.assert_close(out, ref)
    # "position" priority: first choices win over second choices
    first_choice_dropped = [not k for k, c in zip(kept, routing.choice.tolist(), strict=True)
                            if c == 0]
    second_choice_dropped = [not k for k, c in zip(kept, routing.choice.tolist(), strict=True)
                             if c == 1]
    assert sum(second_choice_dropped) >= sum(first_choice_dropped)


def test_expert_choice_runs_every_expert_on_exactly_its_pick() -> None:
    layer = MoE(D, H, 4, 2, routing="expert_choice").eval()
    layer(torch.randn(10, D))
    assert layer.stats.load.tolist() == [5, 5, 5, 5]  # ceil(2 * 10 / 4)
    assert layer.stats.dropped == 0
    assert 0 <= layer.stats.unrouted <= 10


# --------------------------------------------------------------------------- losses
def test_balance_loss_is_one_for_uniform_routing() -> None:
    layer = MoE(D, H, 4, 2).train()
    with torch.no_grad():
        layer.router.weight.zero_()  # every probability 1/4
    layer(torch.randn(6, D))
    assert layer.stats.balance_loss.item() == pytest.approx(1.0)
    assert layer.aux_loss.item() == pytest.approx(0.01)


def test_global_balance_equals_micro_with_one_micro_batch_and_accumulates() -> None:
    torch.manual_seed(3)
    micro = MoE(D, H, 4, 2, balance="micro").train()
    glob = MoE(D, H, 4, 2, balance="global").train()
    glob.load_state_dict(micro.state_dict())
    x = torch.randn(16, D)
    micro(x)
    glob(x)
    torch.testing.assert_close(glob.stats.balance_loss, micro.stats.balance_loss)
    # two micro-batches: the window's f_i equals the concatenated batch's
    glob.reset_balance_window()
    glob(x[:9])
    glob(x[9:])
    micro(x)
    assert torch.equal(glob.balance_counts, micro.stats.requested)


def test_z_loss_and_aux_loss_sum_over_layers() -> None:
    model = torch.nn.Sequential(MoE(D, H, 4, 2, z_loss_weight=1e-3),
                                MoE(D, H, 4, 1, z_loss_weight=1e-3)).train()
    model(torch.randn(5, D))
    expected = sum(0.01 * m.stats.balance_loss + 1e-3 * m.stats.z_loss for m in model)
    torch.testing.assert_close(moe_aux_loss(model), expected)
    model.eval()
    model(torch.randn(5, D))
    assert moe_aux_loss(model) is None and model[0].stats.balance_loss is None


def test_loss_free_bias_moves_load_to_underused_experts() -> None:
    layer = MoE(D, H, 4, 1, balance=None, balance_bias_rate=0.5).train()
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 5.0
    x = torch.randn(32, D).abs()  # expert 0 wins every token
    layer(x)
    assert layer.stats.load[0] == 32
    bias = layer.router.expert_bias.clone()
    assert bias[0] < 0 and torch.all(bias[1:] > 0)
    layer.eval()
    layer(x)  # eval: the bias is used but not updated
    assert torch.equal(layer.router.expert_bias, bias)


def test_noisy_routing_adds_noise_in_training_only() -> None:
    layer = MoE(D, H, 4, 2, noisy=True)
    x = torch.randn(20, D)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))
    layer.train()
    logits_a = layer.router.logits(x)
    logits_b = layer.router.logits(x)
    assert not torch.equal(logits_a, logits_b)
    layer(x).sum().backward()
    assert layer.router.w_noise.grad.abs().sum() > 0


# --------------------------------------------------------------------------- MoE++
def _all_to(layer: MoE, expert: int) -> None:
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.bias.zero_()
        layer.router.bias[expert] = 20.0


def test_copy_expert_returns_its_input_and_zero_expert_returns_zero() -> None:
    layer = MoE(D, H, 2, 1, zero_experts=1, copy_experts=1, router_bias=True).double().eval()
    x = torch.randn(6, D, dtype=torch.float64)
    _all_to(layer, 3)  # experts: 0, 1 FFN; 2 zero; 3 copy
    assert torch.equal(layer(x), x)
    _all_to(layer, 2)
    assert torch.equal(layer(x), torch.zeros_like(x))


def test_constant_expert_with_alpha_one_zero_is_the_copy_expert() -> None:
    layer = MoE(D, H, 2, 1, constant_experts=1, router_bias=True).double().eval()
    _all_to(layer, 2)
    with torch.no_grad():
        layer.constant_w.zero_()
        layer.constant_w[0, 0, 0] = 1e4  # softmax -> (1, 0) exactly for x[:, 0] > 0.1
    x = torch.randn(6, D, dtype=torch.float64)
    x[:, 0] = x[:, 0].abs() + 0.1
    assert torch.equal(layer(x), x)


def test_gating_residual_with_zero_previous_logits_is_the_plain_router() -> None:
    layer = MoE(D, H, 4, 2, prev_experts=6).double().eval()
    x = torch.randn(5, D, dtype=torch.float64)
    torch.testing.assert_close(layer(x, prev_router_logits=torch.zeros(5, 6,
                                                                       dtype=torch.float64)),
                               layer(x))
    with torch.no_grad():
        layer.router.w_residual.normal_()
    prev = torch.randn(5, 6, dtype=torch.float64)
    layer(x, prev_router_logits=prev)
    expected = x @ layer.router.weight.t() + prev @ layer.router.w_residual.t()
    torch.testing.assert_close(layer.stats.router_logits, expected)


def test_moe_plus_plus_balance_weights_zero_computation_experts_by_tau() -> None:
    layer = MoE(D, H, 2, 1, zero_experts=1, copy_experts=1, zc_balance_weight=0.25).train()
    layer(torch.randn(8, D))
    probs = torch.softmax(layer.stats.router_logits, -1)
    f = layer.stats.requested.float() / 8
    weights = torch.tensor([1.0, 1.0, 0.25, 0.25])
    torch.testing.assert_close(layer.stats.balance_loss, 4 * (weights * f * probs.mean(0)).sum())


# --------------------------------------------------------------------------- executed cost
@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
def test_counted_macs_follow_the_routing(backend) -> None:
    dim, hidden, experts, k, tokens = 16, 24, 4, 2, 20
    layer = MoE(dim, hidden, experts, k, zero_experts=1, copy_experts=1, constant_experts=1,
                shared_experts=1, shared_hidden=8, backend=backend).eval()
    x = torch.randn(tokens, dim)
    report = count(layer, x)
    load = layer.stats.load.tolist()
    ffn_rows, constant_rows = sum(load[:experts]), load[-1]
    per_row = dim * 2 * hidden + hidden * dim  # gate|up, down
    router = tokens * dim * (experts + 3)
    shared = tokens * (dim * 2 * 8 + 8 * dim)
    constant = constant_rows * dim * 2  # alpha = softmax(W_c x)
    mix = tokens * k * dim  # each token's k rows, gate-weighted: one (1 x k) @ (k x dim)
    assert report.macs == router + ffn_rows * per_row + shared + constant + mix
    # zero and copy experts cost no matmul: the experts module costs only its rows
    experts_cost = next(m for m in report.modules if m.path == "experts").forward
    assert experts_cost.macs == ffn_rows * per_row
    # FLOPs of the experts: 2 per MAC, silu 4 and the gate product 1 per hidden unit
    assert experts_cost.flops == 2 * ffn_rows * per_row + 5 * ffn_rows * hidden
    assert report.uncounted == {}


def test_backward_is_counted_with_nothing_uncounted() -> None:
    layer = MoE(16, 24, 4, 2, capacity_factor=1.0, copy_experts=1).train()
    report = count(layer, torch.randn(12, 16), backward=True)
    rows = sum(layer.stats.load.tolist()[:4])
    router, up, down, mix = 12 * 16 * 5, rows * 16 * 48, rows * 24 * 16, 12 * 2 * 16
    assert report.macs == router + up + down + mix
    # weight gradients of all three; input gradients only where something upstream needs
    # them: the down projection's (the input x does not require grad); the mix's gradient
    # for both the gates and the rows
    assert report.backward.macs == router + up + 2 * down + 2 * mix
    assert report.uncounted == {}


# --------------------------------------------------------------------------- api
def test_save_load_round_trips_bit_exactly(tmp_path) -> None:
    model = torch.nn.Sequential(
        MoE(D, H, 4, 2, bias=True, output_bias=True, shared_experts=1, zero_experts=1,
            copy_experts=1, constant_experts=1, capacity_factor=1.25, noisy=True,
            router_bias=True, balance_bias_rate=0.01),
        MoE(D, H, 3, 1, gated=False, activation="gelu", prev_experts=8, score="sigmoid"),
    ).eval()
    x = torch.randn(4, D)
    path = leantorch.save(model, tmp_path / "moe.safetensors")
    loaded = leantorch.load(path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    assert loaded[0].spec() == model[0].spec() and loaded[1].spec() == model[1].spec()
    assert torch.equal(loaded[0](x), model[0](x))


def test_bad_arguments_name_the_value_seen() -> None:
    with pytest.raises(LeanError, match="k=5 is more than num_experts=4"):
        MoE(D, H, 4, 5)
    with pytest.raises(LeanError, match="balance='batch'; expected one of 'micro', 'global', None"):
        MoE(D, H, 4, 2, balance="batch")
    with pytest.raises(LeanError, match="expert_choice routing does not take"):
        MoE(D, H, 4, 2, routing="expert_choice", zero_experts=1)
    with pytest.raises(LeanError, match=r"x must be a tensor \(\.\.\., 8\)"):
        MoE(D, H, 4, 2)(torch.randn(3, 5))
    with pytest.raises(LeanError, match="activation must be one of"):
        MoE(D, H, 4, 2, activation="tanh")
    with pytest.raises(LeanError, match="prev_experts"):
        MoE(D, H, 4, 2)(torch.randn(3, D), prev_router_logits=torch.randn(3, 4))


def test_expert_sizes_read_dim_hidden_num_experts_everywhere() -> None:
    # one order for expert shapes: dim, hidden, num_experts (MoE, FeedForward, Router agree);
    # StackedExperts takes them by keyword so an old (num_experts, dim, hidden) call fails
    experts = StackedExperts(dim=8, hidden=6, num_experts=3, gated=False)
    assert experts.w_in.shape == (3, 8, 6) and experts.w_out.shape == (3, 6, 8)
    assert list(experts.spec())[:3] == ["dim", "hidden", "num_experts"]
    with pytest.raises(TypeError):
        StackedExperts(3, 8, 6)  # type: ignore[misc]
    moe = MoE(8, 6, 3, 2)
    assert (moe.experts.dim, moe.experts.hidden, moe.experts.num_experts) == (8, 6, 3)
    assert FeedForward(8, 6).w_out.shape == (6, 8)
    with pytest.raises(LeanError, match="StackedExperts: num_experts=0; expected an int >= 1"):
        StackedExperts(dim=8, hidden=6, num_experts=0)
    with pytest.raises(LeanError, match="MoE: zero_experts=-1; expected an int >= 0"):
        MoE(8, 6, 3, 2, zero_experts=-1)
