"""The one reading of example inputs, used by the graph, ``measure.profile``, ``verify``,
recipes and every transform.

A model's example inputs may be given as:

- a tensor (or any single non-container value): one positional input, ``model(x)``;
- a tuple or list: the positional inputs, ``model(*inputs)``;
- a mapping: keyword inputs, ``model(**inputs)``;
- ``(args, kwargs)``: a tuple of two items, a tuple and a mapping, ``model(*args, **kwargs)``.

    >>> import torch
    >>> from leantorch.inputs import as_call
    >>> x = torch.zeros(2, 3)
    >>> args, kwargs = as_call(x)
    >>> len(args), kwargs
    (1, {})
    >>> as_call({"input_ids": 1})
    ((), {'input_ids': 1})
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from leantorch.errors import LeanError

__all__ = ["ExampleInputs", "as_call", "call"]

#: What every ``example_inputs=`` / calibration batch in leantorch accepts (see the module doc).
ExampleInputs = Any


def as_call(example_inputs: ExampleInputs, *, owner: str = "example_inputs"
            ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` for ``model(*args, **kwargs)`` from any accepted form of example
    inputs (see the module docstring). ``None`` is refused: ``owner`` names the caller in the
    error."""
    if example_inputs is None:
        raise LeanError(f"{owner}: example inputs are None; give a tensor, a tuple or list of "
                        "positional inputs, a mapping of keyword inputs, or (args, kwargs)")
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, tuple) and len(example_inputs) == 2 and \
            isinstance(example_inputs[0], tuple) and isinstance(example_inputs[1], Mapping):
        return tuple(example_inputs[0]), dict(example_inputs[1])
    if isinstance(example_inputs, tuple | list):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def call(model: Any, example_inputs: ExampleInputs) -> Any:
    """``model(*args, **kwargs)`` for the example inputs, read by :func:`as_call`."""
    args, kwargs = as_call(example_inputs)
    return model(*args, **kwargs)
