"""The layout of the attention kinds: ``Attention(kind=...)`` builds the kind's class (a subclass
of ``Attention``), each class is also built directly from its config with the same weights and
outputs, configs validate their own arguments, and an argument of another kind is refused."""

from __future__ import annotations

import copy
import dataclasses
import io

import pytest
import torch

from leantorch.errors import LeanError, LeanTypeError
from leantorch.nn.attention import (
    KIND_CLASSES,
    KINDS,
    Attention,
    BasedConfig,
    BlockSparseConfig,
    ExactAttention,
    GLAConfig,
    KVCache,
    LinearConfig,
    MLAConfig,
    SlidingAttention,
    SlidingConfig,
    TopKConfig,
)
from tests.nn.attention._kinds import DIM, HEADS, KIND_ARGS, make, tokens


@pytest.mark.parametrize("kind", KINDS)
def test_factory_builds_the_kind_class_which_is_an_attention(kind: str) -> None:
    layer = make(kind)
    assert type(layer) is KIND_CLASSES[kind]
    assert isinstance(layer, Attention) and layer.kind == kind


@pytest.mark.parametrize("kind", KINDS)
def test_direct_construction_from_the_config_equals_the_factory(kind: str) -> None:
    via_factory = make(kind)
    cls = KIND_CLASSES[kind]
    config = None if cls.config_class is None else cls.config_class(**KIND_ARGS[kind])
    direct = cls(DIM, HEADS, None if kind == "mla" else 2, config=config).to(torch.float64)
    direct.load_state_dict(via_factory.state_dict())  # same parameter names and shapes
    direct.eval()
    x = tokens()
    assert torch.equal(direct(x), via_factory(x))
    assert direct.kind == kind
    if kind != "block_sparse":  # its config holds a tensor mask, so it compares by identity
        assert direct.config == via_factory.config


def test_direct_construction_from_keywords_and_the_config_record() -> None:
    layer = SlidingAttention(DIM, HEADS, 2, window=7)
    assert layer.config == SlidingConfig(window=7) and layer.window == 7
    assert ExactAttention(DIM, HEADS).config is None
    mla = make("mla")
    assert mla.config == MLAConfig(kv_lora_rank=12, rope_dim=4)  # the default rope_dim resolved
    assert make("gla").config == GLAConfig()


@pytest.mark.parametrize("config,match", [
    (lambda: SlidingConfig(window=0), "window=0"),
    (lambda: TopKConfig(topk=-1), "topk=-1"),
    (lambda: TopKConfig(topk=2.5), "topk=2.5"),
    (lambda: BlockSparseConfig(block_size=4, block_mask=torch.ones(1, 2, 2)), "block_mask"),
    (lambda: MLAConfig(kv_lora_rank=8, rope_dim=-2), "rope_dim=-2"),
    (lambda: LinearConfig(feature_map="cosine"), "feature_map='cosine'"),
    (lambda: LinearConfig(normalize="yes"), "normalize='yes'"),
    (lambda: GLAConfig(gate_normalizer=0.0), "gate_normalizer=0.0"),
    (lambda: BasedConfig(window=4, feature_dim=0), "feature_dim=0"),
    (lambda: GLAConfig(chunk_size=True), "chunk_size=True"),
])
def test_configs_refuse_bad_values_naming_the_argument_and_value(config, match: str) -> None:
    with pytest.raises(LeanError, match=match):
        config()


def test_arguments_of_another_kind_are_refused_naming_the_kinds_they_apply_to() -> None:
    with pytest.raises(LeanError, match=r"window=4 is not used by kind='exact'; it applies to "
                                        r"kinds \('sliding', 'based'\)"):
        Attention(DIM, HEADS, kind="exact", window=4)
    with pytest.raises(LeanError, match=r"chunk_size=8 is not used by kind='topk'; it applies "
                                        r"to kinds \('linear', 'gla', 'based'\)"):
        Attention(DIM, HEADS, kind="topk", topk=2, chunk_size=8)
    with pytest.raises(LeanError, match="topk=3 is not used by kind='sliding'"):
        SlidingAttention(DIM, HEADS, window=4, topk=3)  # a kind class refuses them too
    with pytest.raises(LeanTypeError, match="unexpected argument colour='red'"):
        Attention(DIM, HEADS, kind="exact", colour="red")


def test_config_and_kind_mismatches_are_refused() -> None:
    with pytest.raises(LeanError, match=r"kind='topk'.*kind='sliding'"):
        SlidingAttention(DIM, HEADS, 2, "topk", window=4)
    with pytest.raises(LeanTypeError, match=r"config=TopKConfig.*expected SlidingConfig"):
        SlidingAttention(DIM, HEADS, config=TopKConfig(topk=3))
    with pytest.raises(LeanError, match="window"):
        SlidingAttention(DIM, HEADS, config=SlidingConfig(window=3), window=4)
    with pytest.raises(LeanTypeError, match="expected None"):
        ExactAttention(DIM, HEADS, config=SlidingConfig(window=3))
    with pytest.raises(LeanError, match="window=None with kind='based'"):
        Attention(DIM, HEADS, 2, "based")


def test_layers_copy_and_pickle_as_their_kind_class() -> None:
    layer, x = make("sliding"), tokens()
    twin = copy.deepcopy(layer)
    assert type(twin) is SlidingAttention and torch.equal(twin(x), layer(x))
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is SlidingAttention and torch.equal(loaded(x), layer(x))


def test_configs_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        SlidingConfig(window=3).window = 4  # type: ignore[misc]


def test_the_cache_keeps_what_the_window_selects() -> None:
    """KVCache.write_and_attend with a window keeps the last window - 1 entries, in position
    order after a prompt, and hands the attend callback cached ++ new entries."""
    cache = KVCache.dynamic()
    entry = cache.layer(0)
    seen = []

    def attend(keys, values, positions):
        seen.append(positions[0, 0].tolist())
        return keys

    keys = torch.arange(6, dtype=torch.float64).view(1, 1, 6, 1)
    cache.write_and_attend(entry, keys, keys, torch.arange(6), attend, window=3)
    assert seen[-1] == [0, 1, 2, 3, 4, 5]
    assert cache.positions(0)[0, 0].tolist() == [4, 5]
    step = torch.full((1, 1, 1, 1), 6.0, dtype=torch.float64)
    cache.write_and_attend(entry, step, step, torch.tensor([6]), attend, window=3)
    assert seen[-1] == [4, 5, 6]  # in place: the new entry after the kept ones
    assert sorted(cache.positions(0)[0, 0].tolist()) == [5, 6]
    stored_keys, stored_values, positions = entry.kv.view()
    assert torch.equal(stored_keys[0, 0, :, 0], positions[0, 0].double())
    assert torch.equal(stored_values, stored_keys)
