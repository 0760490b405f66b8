"""The one reading of example inputs and the shared argument checks."""

from __future__ import annotations

import math

import pytest
import torch

from leantorch.errors import LeanError, LeanTypeError
from leantorch.inputs import as_call, call
from leantorch.validate import one_of, positive_int, ratio


def test_every_form_of_example_inputs_reads_the_same_call():
    x, mask = torch.randn(2, 3), torch.ones(2, 3)
    assert as_call(x) == ((x,), {})
    for positional in [(x, mask), [x, mask]]:
        args, kwargs = as_call(positional)
        assert args == (x, mask) and kwargs == {}
    assert as_call({"x": x}) == ((), {"x": x})
    args, kwargs = as_call(((x,), {"mask": mask}))
    assert args == (x,) and kwargs == {"mask": mask}
    # a copy: the caller's mapping is never the one handed on
    given = {"x": x}
    assert as_call(given)[1] is not given


def test_call_runs_the_model_on_the_read_inputs():
    def model(a, b=0):
        return a + b
    assert call(model, (1,)) == 1
    assert call(model, ((1,), {"b": 2})) == 3
    assert call(model, {"a": 4}) == 4
    assert call(model, [5, 1]) == 6


def test_none_is_refused_with_the_caller_named():
    with pytest.raises(LeanError, match=r"prune\.structured: example inputs are None"):
        as_call(None, owner="prune.structured")


def test_positive_int():
    assert positive_int("A", "n", 3) == 3
    assert positive_int("A", "n", 0, minimum=0) == 0
    with pytest.raises(LeanTypeError, match=r"A: n=True; expected an int >= 1"):
        positive_int("A", "n", True)
    with pytest.raises(LeanTypeError, match=r"A: n=2.0"):
        positive_int("A", "n", 2.0)
    with pytest.raises(LeanError, match=r"A: n=0; expected an int >= 1"):
        positive_int("A", "n", 0)


def test_ratio_bounds_and_types():
    assert ratio("P", "r", 0) == 0.0
    assert ratio("P", "r", 0.5) == 0.5
    with pytest.raises(LeanError, match=r"P: r=1; expected a number in \[0, 1\)"):
        ratio("P", "r", 1)
    assert ratio("P", "r", 1, include_high=True) == 1.0
    with pytest.raises(LeanError, match=r"\(0, 1\]"):
        ratio("P", "r", 0, include_low=False, include_high=True)
    for bad in [math.nan, True, "0.5", None]:
        with pytest.raises(LeanTypeError):
            ratio("P", "r", bad)


def test_one_of():
    assert one_of("Q", "mode", "a", ("a", "b")) == "a"
    with pytest.raises(LeanError, match=r"Q: mode='c'; expected one of 'a', 'b'"):
        one_of("Q", "mode", "c", ("a", "b"))
    with pytest.raises(LeanError):
        one_of("Q", "mode", ["unhashable"], ("a",))
