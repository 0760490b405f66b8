"""Block sparsity: whole b x b tiles, exact ratios per layer / row / model, Taylor saliency."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import leantorch
from leantorch.compress.prune.block import block_scores, expand_blocks, prune_block
from leantorch.compress.prune.masks import get_mask
from leantorch.errors import LeanError


def tiles_alive(weight: torch.Tensor, b: int) -> torch.Tensor:
    """(R, C) bool: which tiles of the (out, in) matrix hold any non-zero."""
    rows, cols = weight.shape
    return (weight != 0).reshape(rows // b, b, cols // b, b).any(dim=3).any(dim=1)


def tiles_are_whole(weight: torch.Tensor, b: int) -> bool:
    rows, cols = weight.shape
    nonzero = (weight != 0).reshape(rows // b, b, cols // b, b)
    return bool(torch.all(nonzero.all(dim=(1, 3)) | ~nonzero.any(dim=(1, 3))))


@settings(max_examples=25, deadline=None)
@given(ratio=st.floats(0, 1), b=st.sampled_from([1, 2, 4, 8]), seed=st.integers(0, 999),
       scope=st.sampled_from(["layer", "row", "global"]))
def test_tiles_are_whole_and_the_ratio_is_exact(ratio: float, b: int, seed: int,
                                                scope: str) -> None:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8))
    pruned, _ = prune_block(model, ratio=ratio, block_size=b, scope=scope)
    gone = []
    for path in ("0", "2"):
        weight = pruned.get_submodule(path).weight
        assert tiles_are_whole(weight, b), path
        alive = tiles_alive(weight, b)
        gone.append((~alive).sum().item())
        if scope == "layer":
            assert gone[-1] == round(ratio * alive.numel())
        if scope == "row":
            assert torch.all((~alive).sum(1) == round(ratio * alive.shape[1]))
    if scope == "global":
        total = (16 * 24 + 24 * 8) // (b * b)
        assert sum(gone) == round(ratio * total)


def test_lowest_l1_tiles_go_first() -> None:
    layer = nn.Linear(8, 8, bias=False)
    with torch.no_grad():
        layer.weight.copy_(expand_blocks(torch.tensor([[4.0, 1.0], [3.0, 2.0]]), 4))
    pruned, _ = prune_block(layer, ratio=0.5, block_size=4)
    assert tiles_alive(pruned.weight, 4).tolist() == [[True, False], [True, False]]
    row, _ = prune_block(layer, ratio=0.5, block_size=4, scope="row")
    assert tiles_alive(row.weight, 4).tolist() == [[True, False], [True, False]]


def test_block_scores_match_hand_values() -> None:
    matrix = torch.tensor([[1.0, -2.0, 3.0, 0.0], [0.0, 2.0, -4.0, 0.0]])
    assert block_scores(matrix, 2, "l1").tolist() == [[5.0, 7.0]]
    assert block_scores(matrix, 2, "l2")[0].tolist() == pytest.approx([3.0, 5.0])


def test_transformers_conv1d_tiles_its_transposed_matrix() -> None:
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    layer = Conv1D(nf=8, nx=16)  # weight (16, 8): the matrix is (8, 16)
    torch.nn.init.normal_(layer.weight)
    pruned, _ = prune_block(layer, ratio=0.5, block_size=4)
    matrix = pruned.weight.t()
    assert tiles_are_whole(matrix, 4)
    assert (~tiles_alive(matrix, 4)).sum() == 4


def test_conv_and_non_multiples() -> None:
    model = nn.Sequential(nn.Conv2d(4, 8, 2), nn.Flatten(), nn.Linear(8 * 9, 6))
    pruned, change = prune_block(model, ratio=0.5, block_size=4)
    assert change.replaced == ["0"]  # (8, 4*2*2) tiles; the Linear's 6 rows do not
    assert "not a multiple of block_size=4" in change.skipped["2"]
    assert tiles_are_whole(pruned[0].weight.reshape(8, -1), 4)
    with pytest.raises(LeanError, match="no layer can be tiled"):
        prune_block(nn.Linear(6, 6), ratio=0.5, block_size=4)


def test_taylor_prunes_tiles_whose_inputs_never_fire() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(8, 4)
    calibration = []
    for _ in range(3):
        x = torch.randn(16, 8)
        x[:, 4:] = 0  # the right half of the inputs is always 0: its tiles have no saliency
        calibration.append((x,))
    pruned, _ = prune_block(layer, ratio=0.5, block_size=4, importance="taylor",
                                 calibration=calibration,
                                 loss_fn=lambda out, batch: out.square().sum())
    assert tiles_alive(pruned.weight, 4).tolist() == [[True, False]]
    assert layer.weight.grad is None and pruned.weight.requires_grad
    with pytest.raises(LeanError, match="needs calibration"):
        prune_block(layer, ratio=0.5, block_size=4, importance="taylor")
    # without a loss_fn (and no .loss in the output) the loss is a random projection of the
    # output, as in structured pruning: the dead inputs still score zero
    default, _ = prune_block(layer, ratio=0.5, block_size=4, importance="taylor",
                             calibration=calibration)
    assert tiles_alive(default.weight, 4).tolist() == [[True, False]]
    with pytest.raises(LeanError, match=r"prune.block: loss_fn\(out\) cannot be called as "
                                        r"loss_fn\(output, batch\)"):
        prune_block(layer, ratio=0.5, block_size=4, importance="taylor",
                    calibration=calibration, loss_fn=lambda out: out.sum())


def test_ratio_zero_identity_nesting_and_roundtrip(tmp_path) -> None:
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    same, change = prune_block(model, ratio=0.0, block_size=4)
    assert change.replaced == [] and get_mask(same[0]) is None
    quarter, _ = prune_block(model, ratio=0.25, block_size=4, scope="global")
    half, _ = prune_block(quarter, ratio=0.5, block_size=4, scope="global")
    for path in ("0", "2"):
        a, b = get_mask(quarter.get_submodule(path)), get_mask(half.get_submodule(path))
        assert not (b & ~a).any()
    loaded = leantorch.load(leantorch.save(half, tmp_path / "block.safetensors"))
    x = torch.randn(3, 16)
    assert torch.equal(loaded(x), half(x))
    assert get_mask(model[0]) is None
