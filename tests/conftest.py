from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


def count(model: torch.nn.Module, *inputs: object, **options: object):
    """profile() with the slow, machine-dependent parts off: counting only."""
    from leantorch.measure import profile

    options.setdefault("latency", False)
    options.setdefault("device_spec", None)
    options.setdefault("activations", False)
    return profile(model, *inputs, **options)
