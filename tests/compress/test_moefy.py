"""moefy: exact dense -> MoE split and upcycling on leantorch, BERT, GPT-2 and Llama FFNs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import leantorch
from leantorch.compress.moefy import (
    find_ffns,
    moefy_split,
    moefy_upcycle,
    partition_neurons,
    search_ffns,
    split_ffn,
)
from leantorch.compress.registry import get_transform
from leantorch.errors import LeanError
from leantorch.nn.moe import FeedForward, MoE
from tests._optional import needs_transformers, transformers

T = transformers

D, FF, VOCAB = 16, 40, 50


def _ids(batch: int = 2, seq: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, VOCAB, (batch, seq), generator=g)}


def _calibration() -> list[dict[str, torch.Tensor]]:
    return [_ids(4, 12, seed) for seed in range(1, 4)]


def bert() -> nn.Module:
    config = T.BertConfig(hidden_size=D, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=FF, vocab_size=VOCAB)
    return T.BertModel(config).eval().double()


def gpt2() -> nn.Module:
    config = T.GPT2Config(n_embd=D, n_layer=2, n_head=2, n_inner=FF, vocab_size=VOCAB,
                          bos_token_id=0, eos_token_id=0)
    return T.GPT2LMHeadModel(config).eval().double()


def llama() -> nn.Module:
    config = T.LlamaConfig(hidden_size=D, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=1, intermediate_size=FF, vocab_size=VOCAB,
                           bos_token_id=0, eos_token_id=0)
    return T.LlamaForCausalLM(config).eval().double()


class TinyLean(nn.Module):
    """A leantorch-built model: a FeedForward block and a Sequential MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.ffn = FeedForward(D, FF, "gelu", gated=True, bias=True)
        self.mlp = nn.Sequential(nn.Linear(D, FF), nn.ReLU(), nn.Linear(FF, D))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        h = h + self.ffn(h)
        return h + self.mlp(h)


def lean() -> nn.Module:
    return TinyLean().eval().double()


MODELS = {"bert": bert, "gpt2": gpt2, "llama": llama, "lean": lean}


def _out(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out[0]


# --------------------------------------------------------------------------- finding
@needs_transformers
def test_find_ffns_names_each_kind_by_path() -> None:
    assert [(s.path, s.kind, s.activation) for s in find_ffns(bert(), _ids())] == [
        ("encoder.layer.0.intermediate", "bert", "gelu"),
        ("encoder.layer.1.intermediate", "bert", "gelu")]
    assert [(s.path, s.kind, s.activation, s.dropout) for s in find_ffns(gpt2(), _ids())] == [
        ("transformer.h.0.mlp", "gpt2", "gelu_tanh", 0.1),
        ("transformer.h.1.mlp", "gpt2", "gelu_tanh", 0.1)]
    assert [(s.path, s.kind, s.gated) for s in find_ffns(llama(), _ids())] == [
        ("model.layers.0.mlp", "gated", True), ("model.layers.1.mlp", "gated", True)]
    assert [(s.path, s.kind) for s in find_ffns(lean(), _ids())] == [("ffn", "leantorch"),
                                                             ("mlp", "sequential")]
    assert [s.path for s in find_ffns(bert(), _ids(), include="*.1.*")] == [
        "encoder.layer.1.intermediate"]
    assert find_ffns(bert(), _ids(), exclude="encoder.*") == []


class Renamed(nn.Module):
    """An FFN under names no list knows, with a functional activation."""

    def __init__(self) -> None:
        super().__init__()
        self.alpha, self.beta = nn.Linear(D, FF), nn.Linear(FF, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.beta(F.silu(self.alpha(x)))


class UpFirst(nn.Module):
    """A gated FFN whose up projection is defined and called before its gate."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.gate = nn.Linear(D, FF, bias=False), nn.Linear(D, FF, bias=False)
        self.out = nn.Linear(FF, D, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.up(x) * F.gelu(self.gate(x), approximate="tanh"))


class Twisted(nn.Module):
    """fc1 -> (something) -> fc2, where the something makes it no plain FFN."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.fc1, self.fc2 = nn.Linear(D, FF), nn.Linear(FF, D)
        self.probe = nn.Linear(FF, D) if how == "peek" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc1(x))
        if self.how == "scaled":
            return self.fc2(2.0 * h)
        if self.how == "peek":  # the hidden units are read by a second projection
            return self.fc2(h) + self.probe(h)
        return x + self.fc2(h)  # "residual": the module does more than the FFN


class Hidden(nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.dense, self.act, self.drop = nn.Linear(D, FF), nn.ReLU(), nn.Dropout(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.act(self.dense(x)))


class PostNorm(nn.Module):
    """BERT's layout: one module makes the hidden units, the output projection is elsewhere
    (and this module adds a residual, so it is not the FFN itself)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.hidden, self.out = Hidden(p), nn.Linear(FF, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.out(self.hidden(x))


class Zoo(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.renamed, self.up_first = Renamed(), UpFirst()
        self.tanh_mlp = nn.Sequential(nn.Linear(D, FF), nn.Tanh(), nn.Linear(FF, D))
        self.hidden_dropout = nn.Sequential(nn.Linear(D, FF), nn.ReLU(), nn.Dropout(0.1),
                                            nn.Linear(FF, D))
        self.scaled, self.peek = Twisted("scaled"), Twisted("peek")
        self.residual = Twisted("residual")
        self.post, self.post_dropout = PostNorm(0.0), PostNorm(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(m(x) for m in self.children())


def zoo() -> nn.Module:
    torch.manual_seed(0)
    return Zoo().eval().double()


def test_ffns_are_found_through_the_graph_not_by_names() -> None:
    model, x = zoo(), torch.randn(2, 5, D, dtype=torch.float64)
    sites, skipped = search_ffns(model, x)
    assert [(s.path, s.kind, s.activation, s.gated, s.identity_path) for s in sites] == [
        ("renamed", "dense", "silu", False, None), ("up_first", "gated", "gelu_tanh", True, None),
        ("post.hidden", "bert", "relu", False, "post.out")]
    gated = sites[1]
    # gate columns first, whatever order the module defines and calls them in
    assert torch.equal(gated.w_in[:, :FF], model.up_first.gate.weight.t())
    assert torch.equal(gated.w_in[:, FF:], model.up_first.up.weight.t())
    assert sorted(skipped) == ["hidden_dropout", "peek", "post_dropout", "residual", "scaled",
                               "tanh_mlp"]
    assert "post_dropout.hidden.drop applies dropout (p=0.1)" in skipped["post_dropout"]
    assert "tanh_mlp.1 (Tanh) is not one of leantorch's activations" in skipped["tanh_mlp"]
    assert "hidden_dropout.2 applies dropout (p=0.1)" in skipped["hidden_dropout"]
    assert "another operation sits between" in skipped["scaled"]
    assert "the hidden units feed peek.fc2, peek.probe" in skipped["peek"]
    assert "no module computes exactly this FFN" in skipped["residual"]
    for site in sites[:2]:  # the site is the module's function
        torch.testing.assert_close(site.forward(x), model.get_submodule(site.path)(x),
                                   rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sites[2].hidden_units(x), model.post.hidden(x), rtol=1e-12,
                               atol=1e-12)


def test_split_converts_what_the_graph_found_and_reports_the_rest() -> None:
    model, x = zoo(), torch.randn(2, 5, D, dtype=torch.float64)
    split, change = moefy_split(model, num_experts=4, k=4, partition="random",
                                router="random", example_inputs=x)
    assert change.replaced == ["renamed", "up_first", "post.hidden", "post.out"]
    assert isinstance(split.post.out, nn.Identity)
    assert sorted(change.skipped) == ["hidden_dropout", "peek", "post_dropout", "residual",
                                      "scaled", "tanh_mlp"]
    assert isinstance(split.tanh_mlp, nn.Sequential)  # left alone
    with torch.no_grad():
        torch.testing.assert_close(split(x), model(x), rtol=1e-11, atol=1e-11)


def test_without_example_inputs_only_feedforward_modules_are_found() -> None:
    ffn = nn.Sequential(FeedForward(D, FF, "relu", gated=False).double())
    up, change = moefy_upcycle(ffn, num_experts=2, k=1)
    assert change.replaced == ["0"] and isinstance(up[0], MoE)
    with pytest.raises(LeanError, match="pass example_inputs="):
        moefy_upcycle(zoo(), num_experts=2, k=1)


# --------------------------------------------------------------------------- exact split
@pytest.mark.parametrize("name,partition", [
    pytest.param("bert", "cluster", marks=needs_transformers),
    pytest.param("gpt2", "random", marks=needs_transformers),
    pytest.param("llama", "cluster", marks=needs_transformers),
    ("lean", "contiguous")])
def test_split_with_every_expert_active_is_the_dense_model(name, partition) -> None:
    model = MODELS[name]()
    split, change = moefy_split(model, num_experts=4, k=4, partition=partition,
                                router="calibrated", calibration=_calibration())
    assert len([p for p in change.replaced if p in change.details]) == 2
    torch.testing.assert_close(_out(split, _ids()), _out(model, _ids()), rtol=1e-11,
                               atol=1e-11)
    for details in change.details.values():
        assert details["relative_error"] < 1e-12


def test_partitions_are_disjoint_complete_and_balanced() -> None:
    acts = torch.randn(30, 50)
    for method in ("contiguous", "random", "cluster"):
        groups = partition_neurons(50, 4, method, acts)
        assert sorted(u for g in groups for u in g) == list(range(50))
        assert sorted(len(g) for g in groups) == [11, 13, 13, 13]  # ceil(50 / 4) = 13


def test_uneven_split_pads_experts_with_units_that_contribute_zero() -> None:
    ffn = FeedForward(D, 50, "silu", gated=True, bias=True).double()
    site = find_ffns(nn.Sequential(ffn))[0]
    moe = split_ffn(site, partition_neurons(50, 4, "random"), k=4).eval()
    assert moe.hidden == 13 and moe.experts.w_in.shape == (4, D, 26)
    x = torch.randn(7, D, dtype=torch.float64)
    torch.testing.assert_close(moe(x), ffn(x), rtol=1e-12, atol=1e-12)


def test_clustering_recovers_neurons_that_fire_together() -> None:
    # four blocks of 10 neurons; block b fires only for inputs in its own subspace
    dim, blocks = 8, 4
    w_in = torch.zeros(dim, 40, dtype=torch.float64)
    for b in range(blocks):
        w_in[2 * b: 2 * b + 2, 10 * b: 10 * b + 10] = torch.rand(2, 10, dtype=torch.float64) + 0.5
    x = torch.zeros(200, dim, dtype=torch.float64)
    which = torch.arange(200) % blocks
    for b in range(blocks):
        x[which == b, 2 * b: 2 * b + 2] = torch.rand(50, 2, dtype=torch.float64)
    groups = partition_neurons(40, 4, "cluster", torch.relu(x @ w_in), seed=3)
    assert sorted(map(tuple, groups)) == [tuple(range(10 * b, 10 * b + 10)) for b in range(4)]


@needs_transformers
def test_calibrated_router_picks_k_experts_better_than_chance() -> None:
    model = llama()
    _, fitted = moefy_split(model, num_experts=4, k=1, calibration=_calibration())
    split, chance = moefy_split(model, num_experts=4, k=1, router="random",
                                calibration=_calibration())
    for details in fitted.details.values():
        # the fitted router keeps most of the best expert's contribution; chance keeps ~1/4
        assert details["router_recall"] > 0.8
        assert details["relative_error"] < 1
    layer = split.get_submodule("model.layers.0.mlp")
    _out(split, _ids())
    assert isinstance(layer, MoE) and int(layer.stats.load.sum()) == 12  # 12 tokens x k=1
    assert "router_recall" not in chance.details["model.layers.0.mlp"]


@needs_transformers
def test_active_params_are_router_plus_k_experts_plus_shared_bias() -> None:
    _, change = moefy_split(bert(), num_experts=4, k=2, partition="random", router="random",
                            example_inputs=_ids())
    expert = D * 10 + 10 + 10 * D  # w_in, b_in, w_out of 10 hidden units
    router = 4 * D + 4
    assert change.details["encoder.layer.0.intermediate"]["active_params"] == \
        router + 2 * expert + D


# --------------------------------------------------------------------------- upcycling
@pytest.mark.parametrize("name", [  # each transformers model traces three times: seconds
    name if name == "lean" else pytest.param(name, marks=(needs_transformers, pytest.mark.slow))
    for name in sorted(MODELS)])
def test_upcycled_model_equals_the_dense_one_for_any_router(name) -> None:
    model = MODELS[name]()
    for k, std in ((1, 0.02), (2, 3.0), (3, 10.0)):
        up, change = moefy_upcycle(model, num_experts=3, k=k, router_std=std, seed=k,
                                   example_inputs=_ids())
        torch.testing.assert_close(_out(up, _ids()), _out(model, _ids()), rtol=1e-11,
                                   atol=1e-11)
    assert up.get_submodule(change.replaced[0]).num_experts == 3


@needs_transformers
def test_upcycling_noise_breaks_the_symmetry() -> None:
    model = llama()
    up, _ = moefy_upcycle(model, num_experts=3, k=2, noise=0.05, example_inputs=_ids())
    layer = up.get_submodule("model.layers.0.mlp")
    assert not torch.equal(layer.experts.w_in[0], layer.experts.w_in[1])
    assert not torch.allclose(_out(up, _ids()), _out(model, _ids()))


# --------------------------------------------------------------------------- contract
@pytest.mark.parametrize("name,transform,args", [
    ("bert", "moefy.split", {"num_experts": 4, "k": 2, "partition": "random"}),
    ("gpt2", "moefy.upcycle", {"num_experts": 2, "k": 1, "noise": 0.01}),
    ("llama", "moefy.split", {"num_experts": 4, "k": 1, "capacity_factor": 1.0}),
])
@needs_transformers
def test_registered_transforms_round_trip_save_load_bit_exactly(tmp_path, transform, args,
                                                               name) -> None:
    model = MODELS[name]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fn = get_transform(transform)
    new, change = fn(model, calibration=_calibration(), example_inputs=_ids(), **args)
    assert change.transform == transform and change.after.params != change.before.params
    for key, value in model.state_dict().items():  # the caller's model is untouched
        assert torch.equal(value, before[key]), key
    loaded = leantorch.load(leantorch.save(new, tmp_path / f"{name}.safetensors"))
    assert torch.equal(_out(loaded, _ids()), _out(new, _ids()))


def test_leantorch_model_round_trips_with_a_skeleton(tmp_path) -> None:
    model = lean()
    new, _ = moefy_split(model, num_experts=4, k=2, calibration=[_ids(3, 8)])
    loaded = leantorch.load(leantorch.save(new, tmp_path / "lean.safetensors"),
                            model=TinyLean().double())
    assert torch.equal(_out(loaded, _ids()), _out(new, _ids()))


@needs_transformers
def test_errors_say_what_to_do() -> None:
    with pytest.raises(LeanError, match="pass calibration="):
        moefy_split(bert(), num_experts=4, k=2)
    with pytest.raises(LeanError, match="k=5 is more than num_experts=4"):
        moefy_upcycle(bert(), num_experts=4, k=5)
    with pytest.raises(LeanError, match="no dense FFN matched"):
        moefy_upcycle(bert(), include="nothing.*", example_inputs=_ids())
    with pytest.raises(LeanError, match=r"partition='kmeans'; expected one of 'cluster'"):
        moefy_split(bert(), partition="kmeans", calibration=_calibration())
    with pytest.raises(LeanError, match="set by the FFN"):
        moefy_upcycle(bert(), activation="relu", example_inputs=_ids())
