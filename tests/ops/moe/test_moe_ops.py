"""leantorch.ops.moe: routing, capacity, grouped matmul and dispatch against the naive
reference (values and gradients)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from leantorch.errors import LeanError
from leantorch.ops.moe import (
    balance_loss,
    capacity_for,
    combine,
    combine_topk,
    dispatch_topk,
    expert_choice_routing,
    expert_mlp,
    grouped_matmul,
    grouped_mm_supported,
    plan_dispatch,
    priority_order,
    topk_layout,
    topk_routing,
    z_loss,
)
from leantorch.ops.moe.naive import (
    activation_naive,
    balance_loss_naive,
    kept_by_capacity_naive,
    moe_naive,
    topk_naive,
)

FAST = settings(max_examples=25, deadline=None)


def _weights(experts: int, dim: int, hidden: int, gated: bool, bias: bool,
             dtype: torch.dtype = torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    width = hidden * (2 if gated else 1)
    w_in = torch.randn(experts, dim, width, dtype=dtype, generator=g) / dim**0.5
    w_out = torch.randn(experts, hidden, dim, dtype=dtype, generator=g) / hidden**0.5
    b_in = torch.randn(experts, width, dtype=dtype, generator=g) if bias else None
    b_out = torch.randn(experts, dim, dtype=dtype, generator=g) if bias else None
    return w_in, w_out, b_in, b_out


def _fast_moe(x, routing, w_in, w_out, b_in, b_out, activation, gated, capacity, backend):
    """The sort-based fast path, as the layer composes it."""
    experts = w_in.shape[0]
    plan = plan_dispatch(routing.expert_index, experts, capacity)
    tok = routing.token_index[plan.order]
    y = expert_mlp(x.index_select(0, tok), plan.counts, w_in, w_out, b_in, b_out,
                   activation=activation, gated=gated, backend=backend)
    return combine(y, routing.gates[plan.order], tok, x.shape[0]), plan


# --------------------------------------------------------------------------- routing
@FAST
@given(tokens=st.integers(1, 12), experts=st.integers(1, 6), data=st.data())
def test_topk_routing_matches_the_naive_per_token_choice(tokens, experts, data) -> None:
    k = data.draw(st.integers(1, experts))
    renorm = data.draw(st.booleans())
    logits = torch.randn(tokens, experts, dtype=torch.float64)
    routing = topk_routing(logits, k, gates="renorm" if renorm else "probs")
    chosen, gates = topk_naive(torch.softmax(logits, -1), k, renorm)
    # choice-major flattening: assignment j * tokens + t is token t's (j+1)-th choice
    assert torch.equal(routing.expert_index.view(k, tokens).t(), chosen)
    torch.testing.assert_close(routing.gates.view(k, tokens).t(), gates)
    assert torch.equal(routing.token_index, torch.arange(tokens).repeat(k))
    if renorm:
        torch.testing.assert_close(routing.gates.view(k, tokens).sum(0),
                                   torch.ones(tokens, dtype=torch.float64))


def test_unit_gates_are_exactly_one_and_still_train_the_router() -> None:
    logits = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    routing = topk_routing(logits, 2, gates="unit")
    assert torch.equal(routing.gates, torch.ones(12, dtype=torch.float64))
    (routing.gates * torch.arange(12.0, dtype=torch.float64)).sum().backward()
    assert logits.grad.abs().sum() > 0


def test_sigmoid_scores_are_independent_per_expert() -> None:
    logits = torch.randn(5, 4)
    routing = topk_routing(logits, 2, score="sigmoid", gates="probs")
    expected = torch.sigmoid(logits).gather(1, routing.expert_index.view(2, 5).t())
    torch.testing.assert_close(routing.gates.view(2, 5).t(), expected)


def test_selection_bias_changes_the_choice_but_not_the_gate_values() -> None:
    logits = torch.zeros(4, 3)
    logits[:, 0] = 1.0  # everyone prefers expert 0
    bias = torch.tensor([0.0, 0.0, 5.0])
    routing = topk_routing(logits, 1, gates="probs", selection_bias=bias)
    assert routing.expert_index.tolist() == [2, 2, 2, 2]
    torch.testing.assert_close(routing.gates, torch.softmax(logits, -1)[:, 2])


def test_score_priority_orders_each_choice_rank_by_gate() -> None:
    logits = torch.randn(9, 4)
    routing = priority_order(topk_routing(logits, 2, gates="probs"), "score")
    assert routing.choice.tolist() == [0] * 9 + [1] * 9
    for rank in (0, 1):
        gates = routing.gates[routing.choice == rank]
        assert torch.all(gates[:-1] >= gates[1:])


def test_expert_choice_gives_every_expert_exactly_its_capacity() -> None:
    logits = torch.randn(10, 4)
    routing = expert_choice_routing(logits, 3)
    assert torch.equal(torch.bincount(routing.expert_index), torch.full((4,), 3))
    probs = torch.softmax(logits, -1)
    torch.testing.assert_close(routing.gates, probs[routing.token_index, routing.expert_index])
    for e in range(4):  # each expert took its 3 highest-scoring tokens
        picked = routing.token_index[routing.expert_index == e]
        assert set(picked.tolist()) == set(torch.topk(probs[:, e], 3).indices.tolist())


def test_routing_rejects_bad_arguments_with_the_value_seen() -> None:
    with pytest.raises(LeanError, match=r"k=4; expected an int in \[1, 3\]"):
        topk_routing(torch.randn(2, 3), 4)
    with pytest.raises(LeanError, match="gates='softmax'; expected one of"):
        topk_routing(torch.randn(2, 3), 1, gates="softmax")
    with pytest.raises(LeanError, match="tokens, experts"):
        topk_routing(torch.randn(2, 3, 4), 1)
    with pytest.raises(LeanError, match="capacity_factor"):
        capacity_for(10, num_experts=4, k=2, capacity_factor=0.0)


# --------------------------------------------------------------------------- losses
def test_balance_loss_is_one_when_routing_is_uniform() -> None:
    tokens, experts = 12, 4
    uniform_probs = torch.full((tokens, experts), 1 / experts)
    skewed_counts = torch.tensor([10, 1, 1, 0])
    assert balance_loss(uniform_probs, skewed_counts).item() == pytest.approx(1.0)
    probs = torch.softmax(torch.randn(tokens, experts), -1)
    assert balance_loss(probs, torch.full((experts,), 6)).item() == pytest.approx(1.0)


def test_balance_loss_matches_the_naive_count() -> None:
    logits = torch.randn(20, 5, dtype=torch.float64)
    routing = topk_routing(logits, 2)
    counts = torch.bincount(routing.expert_index, minlength=5)
    torch.testing.assert_close(balance_loss(routing.probs, counts),
                               balance_loss_naive(routing.probs, routing.expert_index.tolist()))


def test_balance_loss_equals_transformers_mixtral_loss_divided_by_k() -> None:
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    logits = torch.randn(30, 8)
    k = 2
    routing = topk_routing(logits, k)
    ours = balance_loss(routing.probs, torch.bincount(routing.expert_index, minlength=8))
    # transformers counts f_i per token (summing to k), we per assignment (summing to 1)
    theirs = mixtral.load_balancing_loss_func((logits,), num_experts=8, top_k=k)
    torch.testing.assert_close(ours * k, theirs)


def test_z_loss_is_the_mean_squared_logsumexp() -> None:
    logits = torch.randn(7, 5, dtype=torch.float64)
    expected = sum(torch.log(torch.exp(row).sum()) ** 2 for row in logits) / 7
    torch.testing.assert_close(z_loss(logits), expected)


# --------------------------------------------------------------------------- capacity
@FAST
@given(assignments=st.lists(st.integers(0, 4), min_size=1, max_size=40),
       capacity=st.integers(0, 10))
def test_capacity_keeps_exactly_the_first_assignments_of_each_expert(assignments,
                                                                     capacity) -> None:
    expert_index = torch.tensor(assignments)
    plan = plan_dispatch(expert_index, 5, capacity)
    kept = kept_by_capacity_naive(assignments, capacity)
    expected = [a for a, keep in enumerate(kept) if keep]
    # kept assignments, grouped by expert, each group in priority order
    assert sorted(plan.order.tolist()) == expected
    assert plan.order.tolist() == sorted(expected, key=lambda a: (assignments[a], a))
    assert plan.dropped == len(assignments) - len(expected)
    assert torch.equal(plan.counts, torch.bincount(expert_index, minlength=5).clamp(max=capacity))


def test_uncapped_experts_never_drop() -> None:
    expert_index = torch.tensor([0, 0, 0, 3, 3, 3, 3])
    plan = plan_dispatch(expert_index, 4, capacity=1, capped_experts=2)
    assert plan.counts.tolist() == [1, 0, 0, 4]
    assert plan.dropped == 2


def test_dispatch_rejects_expert_ids_out_of_range() -> None:
    with pytest.raises(LeanError, match="num_experts=3"):
        plan_dispatch(torch.tensor([0, 5]), 3)


# --------------------------------------------------------------------------- grouped matmul
@FAST
@given(counts=st.lists(st.integers(0, 6), min_size=1, max_size=5), bias=st.booleans(),
       k4=st.integers(1, 3), n4=st.integers(1, 3))
def test_grouped_matmul_backends_agree_with_one_matmul_per_group(counts, bias, k4,
                                                                 n4) -> None:
    groups, in_f, out_f = len(counts), 4 * k4, 4 * n4  # multiples of 16 bytes in float32
    rows = torch.randn(sum(counts), in_f)
    weight = torch.randn(groups, in_f, out_f)
    b = torch.randn(groups, out_f) if bias else None
    count_t = torch.tensor(counts)
    starts = [sum(counts[:e]) for e in range(groups)]
    expected = torch.zeros(sum(counts), out_f)
    for e in range(groups):
        part = rows[starts[e]: starts[e] + counts[e]] @ weight[e]
        expected[starts[e]: starts[e] + counts[e]] = part + (b[e] if bias else 0)
    for backend in ("loop", "grouped_mm", "auto"):
        got = grouped_matmul(rows, weight, count_t, b, backend)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_grouped_mm_backend_gradients_equal_the_loop() -> None:
    counts = torch.tensor([3, 0, 5, 2])
    rows = torch.randn(10, 8, requires_grad=True)
    weight = torch.randn(4, 8, 12, requires_grad=True)
    bias = torch.randn(4, 12, requires_grad=True)
    grads = {}
    for backend in ("loop", "grouped_mm"):
        out = grouped_matmul(rows, weight, counts, bias, backend)
        grads[backend] = torch.autograd.grad(out.sum(), (rows, weight, bias))  # broadcast grad
    for a, b in zip(grads["loop"], grads["grouped_mm"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert grads["loop"][1][1].abs().sum() == 0  # the empty expert gets a zero gradient


def test_grouped_mm_is_refused_where_torch_has_no_kernel() -> None:
    rows, weight = torch.randn(4, 8, dtype=torch.float64), torch.randn(2, 8, 8,
                                                                       dtype=torch.float64)
    assert not grouped_mm_supported(rows, weight)
    with pytest.raises(LeanError, match="grouped_mm"):
        grouped_matmul(rows, weight, torch.tensor([2, 2]), backend="grouped_mm")
    assert not grouped_mm_supported(torch.randn(4, 6), torch.randn(2, 6, 8))  # 24-byte rows


# --------------------------------------------------------------------------- full dispatch
@FAST
@given(tokens=st.integers(1, 10), experts=st.integers(1, 4), gated=st.booleans(),
       bias=st.booleans(), activation=st.sampled_from(["silu", "gelu", "relu", "gelu_tanh"]),
       capacity=st.one_of(st.none(), st.integers(0, 6)), data=st.data())
def test_fast_dispatch_equals_the_naive_loop(tokens, experts, gated, bias, activation,
                                             capacity, data) -> None:
    k = data.draw(st.integers(1, experts))
    dim, hidden = 4, 8
    x = torch.randn(tokens, dim, dtype=torch.float64)
    routing = topk_routing(torch.randn(tokens, experts, dtype=torch.float64), k)
    weights = _weights(experts, dim, hidden, gated, bias)
    fast, plan = _fast_moe(x, routing, *weights, activation, gated, capacity, "loop")
    naive = moe_naive(x, routing.token_index, routing.expert_index, routing.gates, *weights,
                      activation=activation, gated=gated, capacity=capacity)
    torch.testing.assert_close(fast, naive)
    assert plan.dropped == sum(not kept for kept in kept_by_capacity_naive(
        routing.expert_index.tolist(), capacity))


def test_fast_dispatch_gradients_equal_the_naive_loop() -> None:
    tokens, experts, k, dim, hidden = 7, 4, 2, 4, 6
    x = torch.randn(tokens, dim, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(tokens, experts, dtype=torch.float64, requires_grad=True)
    params = [w.requires_grad_() for w in _weights(experts, dim, hidden, True, True)]
    probe = torch.randn(tokens, dim, dtype=torch.float64)

    def grads(fast: bool):
        routing = topk_routing(logits, k)
        if fast:
            out, _ = _fast_moe(x, routing, *params, "silu", True, 3, "loop")
        else:
            out = moe_naive(x, routing.token_index, routing.expert_index, routing.gates,
                            *params, activation="silu", gated=True, capacity=3)
        return torch.autograd.grad((out * probe).sum(), (x, logits, *params))

    for a, b in zip(grads(True), grads(False), strict=True):
        torch.testing.assert_close(a, b)


def test_gradcheck_through_routing_and_dispatch() -> None:
    tokens, experts, k, dim, hidden = 4, 3, 2, 3, 4
    x = torch.randn(tokens, dim, dtype=torch.float64, requires_grad=True)
    router = torch.randn(experts, dim, dtype=torch.float64, requires_grad=True)
    w_in, w_out, _, _ = (w.requires_grad_() if w is not None else None
                         for w in _weights(experts, dim, hidden, True, False))

    def fn(x, router, w_in, w_out):
        routing = topk_routing(x @ router.t(), k)
        out, _ = _fast_moe(x, routing, w_in, w_out, None, None, "silu", True, None, "loop")
        return out

    assert torch.autograd.gradcheck(fn, (x, router, w_in, w_out))


def test_float32_grouped_mm_dispatch_matches_the_float64_reference() -> None:
    tokens, experts, k, dim, hidden = 40, 4, 2, 16, 32
    x = torch.randn(tokens, dim)
    routing = topk_routing(torch.randn(tokens, experts), k)
    weights = _weights(experts, dim, hidden, True, False, dtype=torch.float32)
    fast, _ = _fast_moe(x, routing, *weights, "silu", True, None, "grouped_mm")
    naive = moe_naive(x.double(), routing.token_index, routing.expert_index,
                      routing.gates.double(), *(w.double() if w is not None else None
                                                for w in weights))
    torch.testing.assert_close(fast.double(), naive, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("priority,capacity", [("position", None), ("score", 4),
                                               ("position", 3)])
def test_permutation_dispatch_and_batched_combine_equal_gather_and_scatter_add(priority,
                                                                               capacity) -> None:
    tokens, experts, k, dim = 9, 4, 3, 5
    routing = priority_order(topk_routing(torch.randn(tokens, experts, dtype=torch.float64), k),
                             priority)
    plan = plan_dispatch(routing.expert_index, experts, capacity)
    layout = topk_layout(plan, routing.token_index, routing.choice, tokens, k)
    assert torch.equal(torch.sort(layout.slot_of_row).values, torch.arange(tokens * k))
    assert torch.equal(layout.slot_of_row[layout.row_of_slot], torch.arange(tokens * k))
    kept = plan.order.numel()
    x = torch.randn(tokens, dim, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(dim, dim, dtype=torch.float64, requires_grad=True)
    gates = routing.gates.detach().clone().requires_grad_()

    def permuted(x, weight, gates):
        rows = dispatch_topk(x, layout)
        out = torch.cat([rows[:kept] @ weight, rows.new_zeros(tokens * k - kept, dim)])
        by_slot = torch.zeros(tokens * k, dtype=gates.dtype).index_put(
            (routing.token_index * k + routing.choice,), gates)
        return combine_topk(out, layout, by_slot.view(tokens, k))

    def scattered(x, weight, gates):
        token = routing.token_index[plan.order]
        return combine(x.index_select(0, token) @ weight, gates[plan.order], token, tokens)

    torch.testing.assert_close(permuted(x, weight, gates), scattered(x, weight, gates))
    assert torch.autograd.gradcheck(permuted, (x, weight, gates))
    grads = [torch.autograd.grad(f(x, weight, gates).square().sum(), (x, weight, gates))
             for f in (permuted, scattered)]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("gated,bias", [(True, False), (False, True)])
def test_loop_and_grouped_expert_mlp_agree_with_empty_experts(gated, bias) -> None:
    counts = torch.tensor([5, 0, 7, 0])
    rows = torch.randn(12, 8)
    weights = [w.requires_grad_() if w is not None else None
               for w in _weights(4, 8, 12, gated, bias, dtype=torch.float32)]
    probe = torch.randn(12, 8)
    results = {}
    for backend in ("loop", "grouped_mm"):
        for rows_need_grad in (False, True):
            x = rows.clone().requires_grad_(rows_need_grad)
            out = expert_mlp(x, counts, *weights, activation="gelu", gated=gated,
                             backend=backend)
            inputs = [w for w in weights if w is not None] + ([x] if rows_need_grad else [])
            results[backend, rows_need_grad] = (out, *torch.autograd.grad(
                (out * probe).sum(), inputs))
    for key in ((False,), (True,)):
        for a, b in zip(results[("loop", *key)], results[("grouped_mm", *key)], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # idle experts (1 and 3) get exactly zero gradients in every weight and bias
    for grad in results["loop", True][1:1 + sum(w is not None for w in weights)]:
        assert torch.equal(grad[1], torch.zeros_like(grad[1]))
        assert torch.equal(grad[3], torch.zeros_like(grad[3]))
        assert grad[0].abs().sum() > 0


def test_unit_gates_stay_one_when_a_probability_underflows() -> None:
    logits = torch.tensor([[0.0, -200.0, -300.0]], requires_grad=True)  # p = 1, 0, 0 in fp32
    routing = topk_routing(logits, 2, gates="unit")
    assert torch.equal(routing.gates, torch.ones(2))
    routing.gates.sum().backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("activation", ["silu", "relu", "gelu"])
@pytest.mark.parametrize("gated,bias", [(True, False), (True, True), (False, True)])
def test_loop_inference_path_equals_the_autograd_loop(activation, gated, bias) -> None:
    # without autograd the loop reuses one buffer and applies silu/relu in place: same values
    counts = torch.tensor([5, 0, 7, 3])
    rows = torch.randn(15, 8, dtype=torch.float64)
    weights = [w.requires_grad_() if w is not None else None
               for w in _weights(4, 8, 12, gated, bias, dtype=torch.float64)]
    trained = expert_mlp(rows, counts, *weights, activation=activation, gated=gated,
                         backend="loop")
    assert trained.requires_grad  # the autograd Function ran
    with torch.no_grad():
        inferred = expert_mlp(rows, counts, *weights, activation=activation, gated=gated,
                              backend="loop")
    frozen = [w.detach() if w is not None else None for w in weights]
    plain = expert_mlp(rows, counts, *frozen, activation=activation, gated=gated,
                       backend="loop")  # grad mode on, nothing requires grad
    torch.testing.assert_close(inferred, trained.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(plain, trained.detach(), rtol=1e-12, atol=1e-12)
    # and against the experts written out by hand
    act = {"silu": torch.nn.functional.silu, "relu": torch.relu,
           "gelu": torch.nn.functional.gelu}[activation]
    w_in, w_out, b_in, b_out = frozen
    expected, start = [], 0
    for e, n in enumerate(counts.tolist()):
        h = rows[start:start + n] @ w_in[e] + (b_in[e] if bias else 0)
        a = act(h[:, :12]) * h[:, 12:] if gated else act(h)
        expected.append(a @ w_out[e] + (b_out[e] if bias else 0))
        start += n
    torch.testing.assert_close(inferred, torch.cat(expected), rtol=1e-12, atol=1e-12)


def test_naive_activations_are_their_formulas() -> None:
    # the reference's own activations, against torch's and against values computed by hand
    x = torch.linspace(-6, 6, 241, dtype=torch.float64)
    torch_fns = {"relu": torch.relu, "gelu": torch.nn.functional.gelu, "silu": torch.sigmoid,
                 "gelu_tanh": lambda t: torch.nn.functional.gelu(t, approximate="tanh")}
    for name, fn in torch_fns.items():
        expected = x * fn(x) if name == "silu" else fn(x)
        torch.testing.assert_close(activation_naive(name, x), expected, rtol=1e-14, atol=1e-15)
    one = torch.ones((), dtype=torch.float64)
    assert float(activation_naive("gelu", one)) == pytest.approx(0.8413447460685429, abs=1e-15)
    assert float(activation_naive("silu", -one)) == pytest.approx(-0.2689414213699951, abs=1e-15)
    assert float(activation_naive("relu", -one)) == 0.0
    with pytest.raises(LeanError, match="name='tanh'; expected one of"):
        activation_naive("tanh", x)
