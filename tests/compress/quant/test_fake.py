"""Fake quantization (QAT): straight-through gradients, and ``convert`` giving the real
quantized module with the same outputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from leantorch.compress.quant import (
    FakeQuantLinear,
    Int8DynamicLinear,
    TernaryLinear,
    WeightOnlyLinear,
)
from leantorch.errors import LeanError
from leantorch.ops.quant import naive
from leantorch.ops.quant.fake import (
    fake_quantize_groupwise,
    fake_quantize_per_token,
    fake_quantize_ternary,
)

U32 = 2.0**-24

SCHEMES = [
    ("int8_dynamic", {}),
    ("int8_weight", {}),
    ("int8_weight", {"group_size": 8, "symmetric": False}),
    ("int4_weight", {"group_size": 8, "symmetric": False}),
    ("int4_weight", {"group_size": 16, "symmetric": True}),
    ("ternary", {"activation_bits": 8}),
    ("ternary", {"activation_bits": None}),
]


def linear(in_features: int = 16, out_features: int = 6, dtype=torch.float32) -> nn.Linear:
    torch.manual_seed(1)
    return nn.Linear(in_features, out_features, dtype=dtype)


@pytest.mark.parametrize(("scheme", "options"), SCHEMES)
def test_gradients_are_the_straight_through_ones(scheme, options) -> None:
    """dL/dW is the gradient with respect to the fake-quantized weight, dL/dx the one with
    respect to the fake-quantized input (float64, so the comparison is tight)."""
    layer = FakeQuantLinear.from_linear(linear(dtype=torch.float64), scheme, **options)
    x = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    g = torch.randn(5, 6, dtype=torch.float64)
    (layer(x) * g).sum().backward()
    with torch.no_grad():
        w_hat = layer.fake_weight()
        x_hat = fake_quantize_per_token(x) if layer.activation_bits else x
    assert not torch.equal(w_hat, layer.weight)  # the forward really quantized
    torch.testing.assert_close(layer.weight.grad, g.t() @ x_hat, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, g @ w_hat, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.bias.grad, g.sum(0), rtol=1e-12, atol=1e-12)


def test_fake_quantizers_pass_the_gradient_unchanged() -> None:
    w = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, 8, dtype=torch.float64)
    for fn in (lambda t: fake_quantize_groupwise(t, 4, 4, False), fake_quantize_ternary,
               fake_quantize_per_token):
        w.grad = None
        (fn(w) * g).sum().backward()
        assert torch.equal(w.grad, g)


def test_fake_quantizers_compute_the_reference_values() -> None:
    w = torch.randn(4, 8)
    q, scale, offset = naive.quantize_groupwise(w, 4, 4, False)
    assert torch.equal(fake_quantize_groupwise(w, 4, 4, False),
                       naive.dequantize_groupwise(q, scale, offset))
    t, gamma = naive.quantize_ternary(w)
    assert torch.equal(fake_quantize_ternary(w), naive.dequantize_ternary(t, gamma))
    q, scale = naive.quantize_per_token(w)
    assert torch.equal(fake_quantize_per_token(w), q.float() * scale)


@pytest.mark.parametrize(("scheme", "options"), SCHEMES)
def test_convert_gives_the_real_module_with_equal_outputs(scheme, options) -> None:
    fake = FakeQuantLinear.from_linear(linear(), scheme, **options)
    real = fake.to_quantized()
    expected_type = {"int8_dynamic": Int8DynamicLinear, "ternary": TernaryLinear}.get(
        scheme, WeightOnlyLinear)
    assert type(real) is expected_type
    x = torch.randn(2, 7, 16)
    with torch.no_grad():
        y_fake, y_real = fake(x), real(x)
    if fake.activation_bits is None:
        # weight-only: the real module dequantizes to the very same weight bits
        assert torch.equal(real.dequantized_weight(), fake.fake_weight())
        assert torch.equal(y_real, y_fake)
    else:
        # int8 activations: same codes and scales; the fake one sums float32 products, the
        # real one integers, so they differ by the fake one's float32 rounding only
        q, s = naive.quantize_per_token(x.reshape(-1, 16))
        terms = (q.double().abs() * s.double()) @ fake.fake_weight().double().abs().t()
        bound = (16 + 4) * U32 * (terms + fake.bias.double().abs()).reshape(2, 7, 6)
        assert ((y_real.double() - y_fake.double()).abs() <= bound).all()


def test_qat_fine_tuning_reduces_the_quantized_models_error() -> None:
    """A ternary student trained through the straight-through estimator gets closer to its
    float teacher than the post-training ternary model it started from."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    student = nn.Sequential(*[FakeQuantLinear.from_linear(m, "ternary") if isinstance(
        m, nn.Linear) else m for m in teacher])
    data = torch.randn(128, 16)
    with torch.no_grad():
        target = teacher(data)
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-3)

    def loss() -> torch.Tensor:
        return (student(data) - target).pow(2).mean()

    before = loss().item()
    for _ in range(100):
        optimizer.zero_grad()
        value = loss()
        value.backward()
        optimizer.step()
    assert loss().item() < 0.5 * before


def test_fake_quant_rejects_impossible_combinations() -> None:
    with pytest.raises(LeanError, match="scheme="):
        FakeQuantLinear(8, 4, scheme="int2")
    with pytest.raises(LeanError, match="group_size"):
        FakeQuantLinear(8, 4, scheme="int8_dynamic", group_size=4)
    with pytest.raises(LeanError, match="activation_bits"):
        FakeQuantLinear(8, 4, scheme="ternary", activation_bits=4)
    with pytest.raises(LeanError, match="group_size=3"):
        FakeQuantLinear(8, 4, scheme="int4_weight", group_size=3)
