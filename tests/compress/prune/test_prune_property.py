"""Property: on random small models built from Linear / Conv / BatchNorm / LayerNorm / residual /
concat / split pieces, with extra modules that only the training forward runs and a module no
forward runs, the physically pruned model equals the masked reference in eval AND training mode,
and the unused module is left whole and reported."""

from __future__ import annotations

import copy
from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from leantorch.compress.graph import build_graph
from leantorch.compress.prune import mask_units, prune_structured

PIECES = ("plain", "residual", "concat", "split", "norm")


class Piece(nn.Module):
    """One block of width ``c`` in, ``self.out`` out. ``conv``: 3x3 convs on (B, C, H, W) with
    optional BatchNorm; else Linear layers on (B, C) with optional LayerNorm (pre-norm)."""

    def __init__(self, kind: str, conv: bool, c: int, a: int, b: int, norm: bool) -> None:
        super().__init__()
        self.kind, self.conv = kind, conv

        def layer(i: int, o: int) -> nn.Module:
            return nn.Conv2d(i, o, 3, padding=1) if conv else nn.Linear(i, o)

        def normalise(width: int) -> nn.Module:
            if not norm:
                return nn.Identity()
            return nn.BatchNorm2d(width) if conv else nn.LayerNorm(width)

        if kind == "plain":
            self.f, self.n = layer(c, a), normalise(a)
            self.out = a
        elif kind == "residual":  # x + f2(relu(norm(f1(x))))
            self.f1, self.n, self.f2 = layer(c, a), normalise(a), layer(a, c)
            self.out = c
        elif kind == "concat":  # cat([f1(x), f2(x)])
            self.f1, self.f2 = layer(c, a), layer(c, b)
            self.out = a + b
        elif kind == "split":  # first k features through f, the rest passed along
            self.k = max(1, min(c - 1, a)) if c > 1 else 0
            self.f = layer(self.k or c, b)
            self.out = b + (c - self.k if self.k else 0)
        else:  # "norm": a normalisation of the running width
            self.n = normalise(c) if norm else (nn.BatchNorm2d(c) if conv else nn.LayerNorm(c))
            self.out = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "plain":
            return torch.relu(self.n(self.f(x)))
        if self.kind == "residual":
            return x + self.f2(torch.relu(self.n(self.f1(x))))
        if self.kind == "concat":
            return torch.cat([torch.relu(self.f1(x)), torch.tanh(self.f2(x))], dim=1)
        if self.kind == "split":
            if not self.k:
                return torch.relu(self.f(x))
            k = self.f.weight.shape[1]  # read from the layer, so it follows a cut
            first, rest = torch.split(x, [k, x.shape[1] - k], dim=1)
            return torch.cat([torch.relu(self.f(first)), rest], dim=1)
        return self.n(x)


class RandomNet(nn.Module):
    """Pieces in a row, a classifier, extra modules on some pieces' outputs that only the
    training forward runs (a head on pooled features, a 1x1 / square projection), and a module
    no forward runs."""

    def __init__(self, conv: bool, pieces: list[tuple[str, int, int, bool]],
                 extras: dict[int, str], dead: bool) -> None:
        super().__init__()
        self.conv = conv
        width, blocks = 3, []
        widths = []
        for kind, a, b, norm in pieces:
            blocks.append(Piece(kind, conv, width, a, b, norm))
            width = blocks[-1].out
            widths.append(width)
        self.blocks = nn.ModuleList(blocks)
        self.classifier = nn.Linear(width, 2)
        self.train_only = nn.ModuleDict()
        for index, kind in extras.items():
            if index >= len(widths):
                continue
            c = widths[index]
            if kind == "head":
                self.train_only[str(index)] = nn.Linear(c, 1)
            else:
                self.train_only[str(index)] = nn.Conv2d(c, c, 1) if conv else nn.Linear(c, c)
        self.dead = nn.Linear(4, 4) if dead else None

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)) if self.conv else x

    def forward(self, x: torch.Tensor) -> Any:
        extra = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if self.training and str(i) in self.train_only:
                module = self.train_only[str(i)]
                extra.append(module(self.pool(x) if isinstance(module, nn.Linear) and
                                    module.out_features == 1 else x))
        out = self.classifier(self.pool(x))
        return (out, *extra) if self.training else out


def outputs(model: nn.Module, x: torch.Tensor, training: bool) -> list[torch.Tensor]:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train(training)
    with torch.no_grad():
        out = model(x)
    model.eval()
    model.load_state_dict(state)  # BatchNorm statistics back as they were
    return list(out) if isinstance(out, tuple) else [out]


piece = st.tuples(st.sampled_from(PIECES), st.integers(2, 6), st.integers(2, 6), st.booleans())


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv=st.booleans(), pieces=st.lists(piece, min_size=1, max_size=4),
       extras=st.dictionaries(st.integers(0, 3), st.sampled_from(["head", "proj"]),
                              max_size=2),
       dead=st.booleans(), ratio=st.sampled_from([0.25, 0.5]), seed=st.integers(0, 99))
def test_pruned_equals_masked_in_eval_and_training_mode(
        conv: bool, pieces: list[tuple[str, int, int, bool]], extras: dict[int, str],
        dead: bool, ratio: float, seed: int) -> None:
    torch.manual_seed(seed)
    model = RandomNet(conv, pieces, extras, dead).eval()
    for p in model.parameters():  # norm parameters away from identity
        if p.dim() == 1:
            p.data.uniform_(0.5, 1.5)
    x = torch.randn(3, 3, 4, 4) if conv else torch.randn(5, 3)
    graph = build_graph(model, x)
    assert graph.modes == ["eval", "train"]
    # only groups whose removal is exactly zeroing are compared with the masked model
    inexact = {g.name: 0.0 for g in graph.groups() if not g.exact}
    pruned, change = prune_structured(model, ratio=ratio, units=["channels", "neurons"],
                                      importance="random", seed=seed, per_layer=inexact,
                                      example_inputs=x)
    removed = change.details.get("removed", {})
    assert all(g["exact"] for g in change.details.get("groups", {}).values())
    reference = mask_units(copy.deepcopy(model), graph,
                           {graph.group(name).id: units for name, units in removed.items()})
    for training in (False, True):
        got, want = outputs(pruned, x, training), outputs(reference, x, training)
        assert len(got) == len(want) == (1 + len(model.train_only) if training else 1)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    if dead:
        assert "weight, bias left whole" in change.skipped["dead"]
        assert torch.equal(pruned.dead.weight, model.dead.weight)
    # every module's size attributes agree with its tensors (no half-cut module)
    for module in pruned.modules():
        if isinstance(module, nn.Linear):
            assert module.weight.shape == (module.out_features, module.in_features)
            assert module.bias.shape == (module.out_features,)
        elif isinstance(module, nn.Conv2d):
            assert module.weight.shape[:2] == (module.out_channels, module.in_channels)
