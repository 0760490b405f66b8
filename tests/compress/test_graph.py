"""The dependency graph: which dimensions are coupled, asserted group by group on plain modules
and on small transformers models (random weights)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from leantorch.compress.graph import DependencyGraph, Group, build_graph
from leantorch.errors import LeanError
from tests._optional import needs_transformers, transformers

B, N, D, HEADS, FF, VOCAB = 2, 10, 32, 4, 48, 100


# --------------------------------------------------------------------------- helpers
def cuts(group: Group, unit: int = 0) -> dict[tuple[str, int], list[int]]:
    """Indices each tensor loses when ``unit`` is cut."""
    return {(t.tensor, t.dim): t.indices([unit]).tolist() for t in group.tensors}


def prunable(graph: DependencyGraph, kind: str | None = None) -> list[Group]:
    return graph.groups(prunable=True, kind=kind)


def only(groups: list[Group]) -> Group:
    assert len(groups) == 1, [g.name for g in groups]
    return groups[0]


def rows(start: int, count: int) -> list[int]:
    return list(range(start, start + count))


# --------------------------------------------------------------------------- plain modules
class ConvChain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_conv_norm_conv_chain_couples_outputs_norms_and_consumer_inputs() -> None:
    graph = build_graph(ConvChain().eval(), torch.randn(2, 3, 8, 8))
    first, second = prunable(graph, "channels")
    assert (first.size, second.size) == (8, 16)
    assert cuts(first, 5) == {
        ("conv1.weight", 0): [5], ("conv1.bias", 0): [5], ("bn1.weight", 0): [5],
        ("bn1.bias", 0): [5], ("bn1.running_mean", 0): [5], ("bn1.running_var", 0): [5],
        ("conv2.weight", 1): [5]}
    assert cuts(second, 3) == {
        ("conv2.weight", 0): [3], ("conv2.bias", 0): [3], ("bn2.weight", 0): [3],
        ("bn2.bias", 0): [3], ("bn2.running_mean", 0): [3], ("bn2.running_var", 0): [3],
        ("fc.weight", 1): [3]}
    assert first.exact and second.exact
    # the input channels, the kernel windows and the logits stay
    fixed = {g.kind: g for g in graph.groups(prunable=False)}
    assert "model input x" in " ".join(graph.groups_of("conv1.weight")[1].reasons)
    assert "kernel" in fixed
    assert any("reaches a model output" in r for r in graph.groups_of("fc.bias")[0].reasons)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.a, self.a_bn = nn.Conv2d(8, 4, 1, bias=False), nn.BatchNorm2d(4)
        self.b, self.b_bn = nn.Conv2d(4, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem_bn(self.stem(x)))
        y = self.b_bn(self.b(F.relu(self.a_bn(self.a(x)))))
        x = F.relu(x + y)
        return self.head(x.mean(dim=(2, 3)))


def test_residual_add_ties_the_whole_stage() -> None:
    graph = build_graph(Residual().eval(), torch.randn(1, 3, 6, 6))
    stage, inner = sorted(prunable(graph, "channels"), key=lambda g: -g.size)
    assert (stage.size, inner.size) == (8, 4)
    stage_cut = cuts(stage, 2)
    assert {k for k, v in stage_cut.items() if v == [2]} == set(stage_cut)
    assert set(stage_cut) == {
        ("stem.weight", 0), ("stem_bn.weight", 0), ("stem_bn.bias", 0),
        ("stem_bn.running_mean", 0), ("stem_bn.running_var", 0), ("a.weight", 1),
        ("b.weight", 0), ("b_bn.weight", 0), ("b_bn.bias", 0), ("b_bn.running_mean", 0),
        ("b_bn.running_var", 0), ("head.weight", 1)}
    assert set(cuts(inner)) == {("a.weight", 0), ("a_bn.weight", 0), ("a_bn.bias", 0),
                                ("a_bn.running_mean", 0), ("a_bn.running_var", 0),
                                ("b.weight", 1)}
    # the mean over space reduces no channel: the stage is still exact
    assert stage.exact


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.left, self.right = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 6, 1)
        self.merge = nn.Conv2d(10, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.merge(torch.cat([F.relu(self.left(x)), F.relu(self.right(x))], dim=1))


def test_concatenation_maps_each_branch_to_its_offset() -> None:
    graph = build_graph(Concat().eval(), torch.randn(1, 3, 4, 4))
    left, right = prunable(graph, "channels")
    assert (left.size, right.size) == (4, 6)
    assert cuts(left, 3) == {("left.weight", 0): [3], ("left.bias", 0): [3],
                             ("merge.weight", 1): [3]}
    assert cuts(right, 1) == {("right.weight", 0): [1], ("right.bias", 0): [1],
                              ("merge.weight", 1): [5]}


class Depthwise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(3, 8, 1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.project = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(F.relu(self.depthwise(F.relu(self.expand(x)))))


def test_depthwise_conv_ties_its_input_and_output_channels() -> None:
    graph = build_graph(Depthwise().eval(), torch.randn(1, 3, 5, 5))
    group = only(prunable(graph, "channels"))
    assert group.size == 8
    assert cuts(group, 6) == {("expand.weight", 0): [6], ("expand.bias", 0): [6],
                              ("depthwise.weight", 0): [6], ("depthwise.bias", 0): [6],
                              ("project.weight", 1): [6]}


class GatedMLP(nn.Module):
    def __init__(self, dim: int = 8, hidden: int = 6) -> None:
        super().__init__()
        self.up = nn.Linear(dim, 2 * hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.up(x).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * value)


def test_gated_pairs_are_one_neuron_and_the_residual_fixes_the_width() -> None:
    graph = build_graph(GatedMLP().eval(), torch.randn(3, 8))
    group = only(prunable(graph))
    assert (group.kind, group.size) == ("neurons", 6)
    assert cuts(group, 2) == {("up.weight", 0): [2, 8], ("up.bias", 0): [2, 8],
                              ("down.weight", 1): [2]}
    width = only(graph.groups_of("down.bias"))
    assert not width.prunable and "reaches a model output" in width.reasons


class Flatten(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 3 * 3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.relu(self.conv(x)), 1))


def test_flatten_maps_a_channel_to_its_block_of_features() -> None:
    graph = build_graph(Flatten().eval(), torch.randn(2, 3, 3, 3))
    group = only(prunable(graph))
    assert cuts(group, 1) == {("conv.weight", 0): [1], ("conv.bias", 0): [1],
                              ("fc.weight", 1): rows(9, 9)}


@given(widths=st.lists(st.integers(2, 9), min_size=1, max_size=4))
@settings(max_examples=8, deadline=None)
def test_linear_chain_has_one_group_per_hidden_width(widths: list[int]) -> None:
    sizes = [3, *widths, 2]
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(sizes):
        layers += [nn.Linear(a, b), nn.Tanh()]
    model = nn.Sequential(*layers[:-1]).eval()
    graph = build_graph(model, torch.randn(4, 3))
    groups = prunable(graph)
    assert [g.size for g in groups] == widths
    for i, g in enumerate(groups):
        # every unit owns exactly one row of the producer and one column of the consumer
        assert set(cuts(g)) == {(f"{2 * i}.weight", 0), (f"{2 * i}.bias", 0),
                                (f"{2 * i + 2}.weight", 1)}
        for t in g.tensors:
            assert sorted(t.unit_of.tolist()) == list(range(g.size))


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: torch.export cannot follow it
            return self.fc(x)
        return -self.fc(x)


class WithUntraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.odd, self.last = nn.Linear(3, 4), Untraceable(), nn.Linear(4, 2)
        self.hidden = nn.Linear(4, 6)
        self.out = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.odd(torch.relu(self.first(x)))
        return self.last(self.out(torch.relu(self.hidden(x))))


def test_an_untraceable_module_is_named_with_the_leaf_fix() -> None:
    model = WithUntraceable().eval()
    with pytest.raises(LeanError, match=r"'odd' \(Untraceable\).*leaf_modules=\['odd'\]"):
        build_graph(model, torch.ones(2, 3))
    graph = build_graph(model, torch.ones(2, 3), leaf_modules=["odd"])
    # the leaf's tensors are never cut; what enters or leaves it is fixed
    assert not graph.groups_of("odd.fc.weight")
    assert not only(graph.groups_of("first.bias")).prunable
    assert "leaf module odd" in " ".join(only(graph.groups_of("first.bias")).reasons)
    assert only(graph.groups_of("hidden.bias")).prunable
    assert not model.odd.fc._forward_hooks and isinstance(model.odd, Untraceable)


def test_bad_arguments_name_what_is_accepted() -> None:
    with pytest.raises(LeanError, match="example_inputs is required"):
        build_graph(nn.Linear(2, 2), None)
    with pytest.raises(LeanError, match="leaf_modules"):
        build_graph(nn.Sequential(nn.Linear(2, 2)), torch.ones(1, 2), leaf_modules=["nope"])


# --------------------------------------------------------------------------- transformers
T = transformers


def text_inputs() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (B, N), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def tiny_bert() -> nn.Module:
    return T.BertModel(T.BertConfig(hidden_size=D, num_hidden_layers=2, num_attention_heads=HEADS,
                                    intermediate_size=FF, vocab_size=VOCAB)).eval()


def tiny_gpt2() -> nn.Module:
    return T.GPT2LMHeadModel(T.GPT2Config(n_embd=D, n_layer=2, n_head=HEADS, vocab_size=VOCAB,
                                          n_positions=64)).eval()


def tiny_llama(layers: int = 2) -> nn.Module:
    return T.LlamaForCausalLM(T.LlamaConfig(
        hidden_size=D, num_hidden_layers=layers, num_attention_heads=HEADS, num_key_value_heads=2,
        intermediate_size=FF, vocab_size=VOCAB)).eval()


def tiny_vit() -> nn.Module:
    return T.ViTForImageClassification(T.ViTConfig(
        hidden_size=D, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=FF,
        image_size=16, patch_size=8, num_labels=10)).eval()


def tiny_resnet() -> nn.Module:
    return T.ResNetForImageClassification(T.ResNetConfig(
        embedding_size=8, hidden_sizes=[16, 32], depths=[1, 2], num_labels=10)).eval()


def tiny_mixtral() -> nn.Module:
    return T.MixtralForCausalLM(T.MixtralConfig(
        hidden_size=D, num_hidden_layers=1, num_attention_heads=HEADS, num_key_value_heads=HEADS,
        intermediate_size=FF, num_local_experts=4, num_experts_per_tok=2,
        vocab_size=VOCAB)).eval()


def image(size: int = 16) -> torch.Tensor:
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def bert_graph() -> DependencyGraph:
    return build_graph(tiny_bert(), text_inputs())


@pytest.fixture(scope="module")
def gpt2_graph() -> DependencyGraph:
    return build_graph(tiny_gpt2(), text_inputs())


@pytest.fixture(scope="module")
def llama_graph() -> DependencyGraph:
    return build_graph(tiny_llama(), text_inputs())


@needs_transformers
def test_bert_groups(bert_graph: DependencyGraph) -> None:
    groups = prunable(bert_graph)
    assert [(g.kind, g.size) for g in groups] == [("heads", 4), ("neurons", 48)] * 2
    for layer in range(2):
        p = f"encoder.layer.{layer}"
        heads, neurons = groups[2 * layer], groups[2 * layer + 1]
        q = {(f"{p}.attention.self.{n}.{t}", 0): rows(16, 8)
             for n in ("query", "key", "value") for t in ("weight", "bias")}
        assert cuts(heads, 2) == {**q, (f"{p}.attention.output.dense.weight", 1): rows(16, 8)}
        assert cuts(neurons, 7) == {(f"{p}.intermediate.dense.weight", 0): [7],
                                    (f"{p}.intermediate.dense.bias", 0): [7],
                                    (f"{p}.output.dense.weight", 1): [7]}
        assert heads.exact and neurons.exact
    # the width reaches the output (last_hidden_state): an encoder keeps it
    width = only(bert_graph.groups(kind="width"))
    assert not width.prunable and "reaches a model output" in width.reasons
    assert not width.exact  # LayerNorm statistics read the whole width
    per_head = bert_graph.groups(kind="head_dim")
    assert per_head and not any(g.prunable for g in per_head)
    assert bert_graph.sublayers() == []  # post-norm: no branch is computed by one module


@needs_transformers
def test_gpt2_groups_follow_the_fused_qkv_and_tied_embeddings(gpt2_graph: DependencyGraph
                                                             ) -> None:
    groups = prunable(gpt2_graph)
    assert [(g.kind, g.size) for g in groups] == [("width", D)] + \
        [("heads", 4), ("neurons", 4 * D)] * 2
    heads = groups[1]
    fused = rows(8, 8) + rows(D + 8, 8) + rows(2 * D + 8, 8)  # the same head in q, k and v
    assert cuts(heads, 1) == {("transformer.h.0.attn.c_attn.weight", 1): fused,
                              ("transformer.h.0.attn.c_attn.bias", 0): fused,
                              ("transformer.h.0.attn.c_proj.weight", 0): rows(8, 8)}
    assert cuts(groups[2], 5) == {("transformer.h.0.mlp.c_fc.weight", 1): [5],
                                  ("transformer.h.0.mlp.c_fc.bias", 0): [5],
                                  ("transformer.h.0.mlp.c_proj.weight", 0): [5]}
    width = groups[0]
    names = {t.tensor: t for t in width.tensors}
    # one storage, two names: the tied embedding is listed once with its alias
    tied = [t for t in width.tensors if t.aliases]
    assert len(tied) == 1 and {tied[0].tensor, *tied[0].aliases} == {
        "transformer.wte.weight", "lm_head.weight"}
    assert ("transformer.wpe.weight" in names and "transformer.ln_f.weight" in names
            and names["transformer.h.1.attn.c_attn.weight"].dim == 0)
    assert [s.path for s in gpt2_graph.sublayers()] == [
        "transformer.h.0.attn", "transformer.h.0.mlp", "transformer.h.1.attn",
        "transformer.h.1.mlp"]
    assert gpt2_graph.sublayers()[0].norm == "transformer.h.0.ln_1"


@needs_transformers
def test_llama_grouped_kv_heads_and_gated_mlp(llama_graph: DependencyGraph) -> None:
    groups = prunable(llama_graph)
    assert [(g.kind, g.size) for g in groups] == [("width", D)] + \
        [("kv_heads", 2), ("heads", 2), ("neurons", FF)] * 2
    kv, per_group, mlp = groups[1:4]
    p = "model.layers.0"
    # KV head 1 takes its two query heads (rows 16..31) along
    assert cuts(kv, 1) == {(f"{p}.self_attn.q_proj.weight", 0): rows(16, 16),
                           (f"{p}.self_attn.k_proj.weight", 0): rows(8, 8),
                           (f"{p}.self_attn.v_proj.weight", 0): rows(8, 8),
                           (f"{p}.self_attn.o_proj.weight", 1): rows(16, 16)}
    # query head 1 of every KV group: rows 8..15 and 24..31, KV projections untouched
    assert cuts(per_group, 1) == {(f"{p}.self_attn.q_proj.weight", 0): rows(8, 8) + rows(24, 8),
                                  (f"{p}.self_attn.o_proj.weight", 1): rows(8, 8) + rows(24, 8)}
    assert cuts(mlp, 3) == {(f"{p}.mlp.gate_proj.weight", 0): [3],
                            (f"{p}.mlp.up_proj.weight", 0): [3],
                            (f"{p}.mlp.down_proj.weight", 1): [3]}
    width = groups[0]
    assert not width.exact and any("input_layernorm" in r for r in width.inexact_reasons)
    assert {("model.embed_tokens.weight", 1), ("lm_head.weight", 1), ("model.norm.weight", 0),
            (f"{p}.self_attn.o_proj.weight", 0), (f"{p}.mlp.down_proj.weight", 0)} <= \
        set(cuts(width))
    sub = llama_graph.sublayers()
    assert [(s.path, s.kind, s.norm) for s in sub[:2]] == [
        (f"{p}.self_attn", "attention", f"{p}.input_layernorm"),
        (f"{p}.mlp", "mlp", f"{p}.post_attention_layernorm")]


@needs_transformers
def test_vit_groups() -> None:
    graph = build_graph(tiny_vit(), image())
    groups = prunable(graph)
    assert [(g.kind, g.size) for g in groups] == [("width", D)] + [("heads", 4), ("neurons", FF)] * 2
    width = groups[0]
    assert {("vit.embeddings.cls_token", 2), ("vit.embeddings.position_embeddings", 2),
            ("vit.embeddings.patch_embeddings.projection.weight", 0), ("classifier.weight", 1),
            ("vit.layernorm.weight", 0)} <= set(cuts(width))
    heads = groups[1]
    assert len(heads.tensors) == 7 and all(v == rows(24, 8) for v in cuts(heads, 3).values())
    assert [s.kind for s in graph.sublayers()] == ["attention", "mlp"] * 2


@needs_transformers
def test_resnet_groups_tie_each_stage_and_find_identity_blocks() -> None:
    graph = build_graph(tiny_resnet(), image(32))
    groups = prunable(graph)
    assert all(g.kind == "channels" and g.exact for g in groups)
    assert sorted(g.size for g in groups) == [4, 4, 8, 8, 8, 8, 8, 16, 32]
    stage = "resnet.encoder.stages.1.layers"
    residual = only([g for g in groups if g.size == 32])
    producers = {t.tensor for t in residual.tensors if t.role == "out"}
    assert producers == {f"{stage}.0.shortcut.convolution.weight",
                         f"{stage}.0.layer.2.convolution.weight",
                         f"{stage}.1.layer.2.convolution.weight"}
    consumers = {t.tensor for t in residual.tensors if t.role == "in"}
    assert consumers == {f"{stage}.1.layer.0.convolution.weight", "classifier.1.weight"}
    # the second block of the stage has an identity shortcut: the whole block is removable
    assert [(s.path, s.kind) for s in graph.sublayers()] == [(f"{stage}.1.layer", "block")]


@needs_transformers
def test_mixtral_experts_group_router_rows_with_expert_tensors() -> None:
    graph = build_graph(tiny_mixtral(), text_inputs())
    experts = only(prunable(graph, "experts"))
    assert experts.size == 4 and not experts.exact  # the router's softmax reads every expert
    assert cuts(experts, 2) == {("model.layers.0.mlp.gate.weight", 0): [2],
                                ("model.layers.0.mlp.experts.gate_up_proj", 0): [2],
                                ("model.layers.0.mlp.experts.down_proj", 0): [2]}
    neurons = only(prunable(graph, "neurons"))
    assert cuts(neurons, 5) == {("model.layers.0.mlp.experts.gate_up_proj", 1): [5, FF + 5],
                                ("model.layers.0.mlp.experts.down_proj", 2): [5]}


@needs_transformers
def test_group_slices_and_keep_indices_agree(llama_graph: DependencyGraph) -> None:
    kv = prunable(llama_graph, "kv_heads")[0]
    slices = {(n, d): i.tolist() for n, d, i in kv.slices([0])}
    keep = llama_graph.keep_indices("model.layers.0.self_attn.q_proj.weight", 0, {kv.id: [0]})
    assert keep.tolist() == rows(16, 16)
    assert slices[("model.layers.0.self_attn.q_proj.weight", 0)] == rows(0, 16)
    with pytest.raises(LeanError, match=r"units 0\.\.1"):
        kv.slices([2])
    assert "kv_heads" in str(llama_graph) and "fixed" in llama_graph.describe()
