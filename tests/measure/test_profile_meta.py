"""A model on the meta device is counted, never timed: a latency or a measured peak there would
be made up."""

from __future__ import annotations

import pytest
import torch

from leantorch.errors import LeanError
from leantorch.measure import profile


def meta_model() -> tuple[torch.nn.Module, torch.Tensor]:
    return torch.nn.Linear(8, 4, device="meta"), torch.empty(3, 8, device="meta")


@pytest.mark.parametrize("options", [
    {"latency": True, "device_spec": None},
    {"latency": False, "device_spec": "auto"},
    {"latency": False, "device_spec": "measure"},
])
def test_meta_refuses_timing_and_measured_rooflines(options) -> None:
    model, x = meta_model()
    with pytest.raises(LeanError, match="meta device can be counted but not timed"):
        profile(model, x, **options)


def test_meta_counts_like_a_real_device() -> None:
    model, x = meta_model()
    report = profile(model, x, latency=False, device_spec="t4", activations=False)
    assert report.macs == 3 * 8 * 4 and report.latency is None
    assert report.device.name == "t4"  # the datasheet, not a measurement
