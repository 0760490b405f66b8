"""Agreement with torch.utils.flop_counter.FlopCounterMode where it is right (matmul and conv
models), and the documented differences where it is not."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tests.conftest import count
from tests.measure.test_formulas import Fn

aten = torch.ops.aten


def torch_flops(model: nn.Module, *inputs: torch.Tensor, backward: bool = False) -> int:
    with FlopCounterMode(display=False) as counter:
        out = model(*inputs)
        if backward:
            out.sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 10))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=2, dilation=2, groups=4), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.Conv2d(16, 32, 1, stride=2),
        nn.ConvTranspose2d(32, 8, 2, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, 5),
    )


@pytest.mark.parametrize("build,shape", [(mlp, (4, 32)), (cnn, (2, 3, 16, 16))])
def test_matmul_flops_equal_flop_counter_mode(build, shape) -> None:
    model = build().eval()
    x = torch.randn(shape)
    ours = count(model, x)
    assert ours.forward.matmul_flops == torch_flops(model, x)
    # FlopCounterMode counts only matmul-class ops; the rest is ours alone, and not zero
    assert ours.forward.other_flops > 0


def dense_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=2, dilation=2),
        nn.Conv2d(16, 32, 1, stride=2), nn.ConvTranspose2d(32, 8, 2, stride=2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    )


@pytest.mark.parametrize("build,shape", [(mlp, (4, 32)), (dense_cnn, (2, 3, 16, 16))])
def test_backward_matmul_flops_equal_flop_counter_mode(build, shape) -> None:
    model = build().train()
    x = torch.randn(shape)
    ours = count(model, x, backward=True)
    total = ours.forward.matmul_flops + ours.backward.matmul_flops
    assert total == torch_flops(model, x, backward=True)


def test_flop_counter_mode_overcounts_grouped_conv_weight_gradients() -> None:
    # Its convolution_backward formula drops `groups` from the weight gradient, so a grouped
    # conv's weight gradient costs it `groups` times the forward MACs instead of once.
    model = cnn().train()
    x = torch.randn(2, 3, 16, 16)
    ours = count(model, x, backward=True)
    excess_macs = 0
    for i, layer in enumerate(model):
        if isinstance(layer, nn.Conv2d) and layer.groups > 1:
            excess_macs += (layer.groups - 1) * ours.module(str(i)).forward.macs
    assert excess_macs > 0
    ours_total = ours.forward.matmul_flops + ours.backward.matmul_flops
    assert torch_flops(model, x, backward=True) - ours_total == 2 * excess_macs


def test_cpu_sdpa_is_zero_in_flop_counter_mode_and_counted_here() -> None:
    q = k = v = torch.randn(2, 4, 32, 16)
    attention = Fn(lambda q, k, v: F.scaled_dot_product_attention(q, k, v))
    assert torch_flops(attention, q, k, v) == 0  # the documented peer gap
    assert count(attention, q, k, v).forward.matmul_flops == 2 * 2 * 4 * 32 * 32 * (16 + 16)


def test_flop_counter_mode_counts_causal_attention_as_full() -> None:
    # FlopCounterMode's SDPA formula (used for the CUDA kernels) ignores is_causal, so a causal
    # call costs it n^2 pairs; we count the n(n+1)/2 the mask keeps.
    from torch.utils.flop_counter import flop_registry

    n, d = 64, 16
    q = k = v = torch.randn(1, 2, n, d)
    peer = flop_registry[aten._scaled_dot_product_efficient_attention](
        q, k, v, None, False, 0.0, True, out_val=None)
    ours = count(Fn(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
                 q, k, v)
    assert peer == 2 * 2 * n * n * 2 * d
    assert ours.forward.matmul_flops == 2 * 2 * (n * (n + 1) // 2) * 2 * d
    assert peer / ours.forward.matmul_flops == pytest.approx(2 * n / (n + 1))
