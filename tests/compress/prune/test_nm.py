"""N:M sparsity: exactly N of every M weights survive in every group, along the input
dimension, for Linear, Conv2d and transformers' Conv1D."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import leantorch
from leantorch.compress.prune.masks import get_mask
from leantorch.compress.prune.nm import nm_mask, prune_nm
from leantorch.compress.registry import get_transform
from leantorch.errors import LeanError, LeanTypeError


def groups_along_input(weight: torch.Tensor, m: int, dim: int = 1) -> torch.Tensor:
    """Non-zero count of every group of m consecutive weights along ``dim``."""
    moved = weight.movedim(dim, -1)
    return (moved != 0).reshape(*moved.shape[:-1], -1, m).sum(-1)


@settings(max_examples=40, deadline=None)
@given(m=st.integers(2, 8), data=st.data())
def test_every_group_keeps_exactly_n(m: int, data) -> None:
    n = data.draw(st.integers(1, m - 1))
    rows = data.draw(st.integers(1, 6))
    groups = data.draw(st.integers(1, 5))
    layer = nn.Linear(groups * m, rows)
    pruned, change = prune_nm(layer, n=n, m=m)
    assert torch.all(groups_along_input(pruned.weight, m) == n)
    # the kept ones are the largest of their group
    w = layer.weight.reshape(rows, groups, m).abs()
    kept = (pruned.weight != 0).reshape(rows, groups, m)
    smallest_kept = torch.where(kept, w, torch.inf).amin(-1)
    largest_gone = torch.where(kept, -torch.inf, w).amax(-1)
    assert torch.all(largest_gone <= smallest_kept)
    assert change.details["kept"] * m == change.details["total"] * n


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8), (1, 4), (3, 7)])
def test_common_patterns_on_a_model(n: int, m: int) -> None:
    model = nn.Sequential(nn.Linear(56, 28), nn.ReLU(), nn.Linear(28, 10))
    pruned, change = prune_nm(model, n=n, m=m)
    for path in ("0", "2"):
        weight = pruned.get_submodule(path).weight
        if weight.shape[1] % m:
            assert "not a multiple" in change.skipped[path]
            assert get_mask(pruned.get_submodule(path)) is None
        else:
            assert torch.all(groups_along_input(weight, m) == n)


def test_conv_groups_run_along_input_channels_at_every_kernel_position() -> None:
    conv = nn.Conv2d(8, 6, 3)
    pruned, _ = prune_nm(conv, n=2, m=4)
    assert torch.all(groups_along_input(pruned.weight, 4, dim=1) == 2)
    assert pruned.weight.shape == (6, 8, 3, 3)


def test_transformers_conv1d_groups_along_its_first_dimension() -> None:
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    layer = Conv1D(nf=6, nx=8)  # weight (in=8, out=6)
    torch.nn.init.normal_(layer.weight)
    pruned, _ = prune_nm(layer, n=2, m=4)
    assert torch.all(groups_along_input(pruned.weight, 4, dim=0) == 2)
    del transformers


def test_gpt2_blocks_take_2_4_and_roundtrip(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64,
                                     n_positions=32, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    pruned, change = prune_nm(model, n=2, m=4)
    assert "lm_head" in change.skipped  # tied to the token embedding
    assert len(change.replaced) == 2 * 4  # c_attn, c_proj, c_fc, mlp.c_proj per block
    for path in change.replaced:
        weight = pruned.get_submodule(path).weight
        assert torch.all(groups_along_input(weight, 4, dim=0) == 2), path
    loaded = leantorch.load(leantorch.save(pruned, tmp_path / "gpt2.safetensors"))
    ids = torch.randint(0, 64, (2, 7))
    assert torch.equal(pruned(ids).logits, loaded(ids).logits)


def test_n_equal_m_is_the_identity_and_caller_untouched() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    same, change = prune_nm(model, n=4, m=4)
    assert change.replaced == [] and get_mask(same[0]) is None
    pruned, _ = prune_nm(model, n=1, m=4)
    assert get_mask(model[0]) is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert get_mask(pruned[0]) is not None


def test_ties_keep_the_earlier_entry() -> None:
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 2.0, 2.0, 0.0]])
    assert nm_mask(scores, 2, 4).tolist() == [[True, True, False, False,
                                               False, True, True, False]]


def test_nm_on_a_sparser_mask_keeps_at_most_n() -> None:
    layer = nn.Linear(8, 4)
    magnitude = get_transform("prune.magnitude")
    sparse, _ = magnitude(layer, ratio=0.9)
    pruned, _ = prune_nm(sparse, n=2, m=4)
    assert torch.all(groups_along_input(pruned.weight, 4) <= 2)
    assert not (get_mask(pruned) & ~get_mask(sparse)).any()


def test_bad_patterns_raise() -> None:
    with pytest.raises(LeanError, match="1 <= n <= m"):
        prune_nm(nn.Linear(8, 4), n=5, m=4)
    with pytest.raises(LeanError, match="1 <= n <= m"):
        prune_nm(nn.Linear(8, 4), n=0, m=4)
    with pytest.raises(LeanTypeError, match="n must be an int"):
        prune_nm(nn.Linear(8, 4), n=2.0, m=4)
    with pytest.raises(LeanError, match="no layer could take the 2:4 pattern"):
        prune_nm(nn.Linear(6, 4), n=2, m=4)
    with pytest.raises(LeanError, match="multiple of m=4"):
        nm_mask(torch.ones(3, 6), 2, 4)
