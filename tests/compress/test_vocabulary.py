"""One vocabulary across the transforms: every registered transform reads example inputs (and
calibration batches) in each form :func:`leantorch.inputs.as_call` accepts, and gives the same
model and the same Change for each."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from leantorch.compress.registry import accepts, get_transform, transform_names

T = pytest.importorskip("transformers")

# the five spellings of one call model(x) (a Sequential's forward argument is named "input")
FORMS: dict[str, Callable[[str, torch.Tensor], Any]] = {
    "tensor": lambda name, x: x,
    "tuple": lambda name, x: (x,),
    "list": lambda name, x: [x],
    "mapping": lambda name, x: {name: x},
    "args_kwargs": lambda name, x: ((x,), {}),
}


def net() -> nn.Module:
    torch.manual_seed(0)
    ffn = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
    return nn.Sequential(ffn, nn.ReLU(), nn.Linear(16, 8)).eval()


def vector(seed: int = 0) -> torch.Tensor:
    return torch.randn(3, 16, generator=torch.Generator().manual_seed(seed))


def llama() -> nn.Module:
    torch.manual_seed(0)
    return T.LlamaForCausalLM(T.LlamaConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=32, vocab_size=50, bos_token_id=0, eos_token_id=0)).eval()


def mixtral() -> nn.Module:
    torch.manual_seed(0)
    return T.MixtralForCausalLM(T.MixtralConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, vocab_size=50,
        bos_token_id=0, eos_token_id=0)).eval()


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(seed))


# transform -> (model, input name, input builder, arguments, steps applied first)
CASES: dict[str, tuple[Callable[[], nn.Module], str, Callable[[int], torch.Tensor],
                       dict[str, Any], tuple[tuple[str, dict[str, Any]], ...]]] = {
    "quant.int8_dynamic": (net, "input", vector, {}, ()),
    "quant.int8_weight": (net, "input", vector, {"group_size": 8}, ()),
    "quant.int4_weight": (net, "input", vector, {"group_size": 8}, ()),
    "quant.llm_int8": (net, "input", vector, {"threshold": 1.0}, ()),
    "quant.fake_quantize": (net, "input", vector, {"scheme": "int8_dynamic"}, ()),
    "quant.convert": (net, "input", vector, {},
                      (("quant.fake_quantize", {"scheme": "int4_weight", "group_size": 8}),)),
    "lowrank.svd": (net, "input", vector, {"rank": 4, "activation_aware": True}, ()),
    "prune.magnitude": (net, "input", vector, {"ratio": 0.5}, ()),
    "prune.make_permanent": (net, "input", vector, {}, (("prune.magnitude", {"ratio": 0.5}),)),
    "prune.nm": (net, "input", vector, {"n": 2, "m": 4}, ()),
    "prune.block": (net, "input", vector,
                    {"ratio": 0.5, "block_size": 4, "importance": "taylor"}, ()),
    "prune.make_sparse": (net, "input", vector, {"format": "csr"},
                          (("prune.magnitude", {"ratio": 0.9}),)),
    "prune.structured": (net, "input", vector,
                         {"ratio": 0.5, "units": "neurons", "importance": "taylor"}, ()),
    "prune.sublayers": (llama, "input_ids", ids, {"count": 1}, ()),
    "moefy.split": (net, "input", vector, {"num_experts": 4, "k": 2}, ()),
    "moefy.upcycle": (net, "input", vector, {"num_experts": 2, "k": 1, "noise": 0.01}, ()),
    "moefy.convert_mixtral": (mixtral, "input_ids", ids, {}, ()),
    "quant.bf16": (net, "input", vector, {}, ()),
    "quant.fp16": (net, "input", vector, {}, ()),
    "quant.autocast": (net, "input", vector, {}, ()),
}


def _ours() -> set[str]:
    return {n for n in transform_names() if get_transform(n).__module__.startswith("leantorch.")}


def test_every_registered_transform_has_an_input_forms_case() -> None:
    assert _ours() <= set(CASES), sorted(_ours() - set(CASES))


def _apply(name: str, form: str) -> tuple[nn.Module, dict[str, Any]]:
    build, key, make, args, before = CASES[name]
    spell = FORMS[form]
    model = build()
    example = spell(key, make(0))
    for step, step_args in before:
        model, _ = get_transform(step)(model, example_inputs=example, **step_args)
    fn = get_transform(name)
    extra = {"calibration": [spell(key, make(s)) for s in (1, 2)]} \
        if accepts(fn, "calibration") else {}
    torch.manual_seed(0)  # moefy.upcycle's noise
    out, change = fn(model, example_inputs=example, **extra, **args)
    return out, change.to_dict()


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_form_of_example_inputs_gives_the_same_model_and_change(name: str) -> None:
    # a first run in the process builds the cached lookup tables of the int4/ternary kernels
    # (ops/quant/weight_only.py), whose construction the first profile counts as bytes moved
    _apply(name, "tensor")
    reference_model, reference_change = _apply(name, "tensor")
    assert reference_change["before"]["flops"] is not None  # the inputs were read and counted
    reference_state = reference_model.state_dict()
    for form in ("tuple", "list", "mapping", "args_kwargs"):
        model, change = _apply(name, form)
        assert change == reference_change, form
        state = model.state_dict()
        assert state.keys() == reference_state.keys(), form
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                ref = reference_state[key]
                if value.layout != torch.strided:
                    value, ref = value.to_dense(), ref.to_dense()
                assert torch.equal(value, ref), (form, key)


# --------------------------------------------------------------------------- registry names
def test_every_registry_name_is_family_dot_function_name() -> None:
    for name in sorted(_ours()):
        fn = get_transform(name)
        family, _, function = name.partition(".")
        assert fn.__module__.startswith(f"leantorch.compress.{family}"), (name, fn.__module__)
        assert fn.__name__ == function, (name, fn.__name__)


def test_renamed_transforms_keep_their_old_names_and_imports() -> None:
    from leantorch.compress import lowrank as lowrank_module
    from leantorch.compress import moefy, prune, quant
    from leantorch.compress.registry import DEPRECATED_NAMES

    assert moefy.moefy_split is get_transform("moefy.split")
    assert moefy.moefy_upcycle is get_transform("moefy.upcycle")
    assert prune.prune_structured is get_transform("prune.structured")
    assert prune.prune_sublayers is get_transform("prune.sublayers")
    assert prune.prune_magnitude is prune.magnitude is get_transform("prune.magnitude")
    assert prune.prune_nm is get_transform("prune.nm")
    assert prune.prune_block is get_transform("prune.block")
    assert lowrank_module.lowrank is lowrank_module.svd is get_transform("lowrank.svd")
    assert quant.fake_quantize is get_transform("quant.fake_quantize")
    assert DEPRECATED_NAMES == {"quant.fake": "quant.fake_quantize"}
    for old, new in DEPRECATED_NAMES.items():
        with pytest.warns(DeprecationWarning, match=rf"{old!r} is now called {new!r}"):
            assert get_transform(old) is get_transform(new)
        assert old not in transform_names() and new in transform_names()


def test_a_recipe_with_an_old_transform_name_warns_and_runs_the_new_one() -> None:
    from leantorch.compress.recipe import Recipe

    spec = {"name": "old", "steps": [{"transform": "quant.fake",
                                      "args": {"scheme": "ternary"}}]}
    with pytest.warns(DeprecationWarning, match="'quant.fake' is now called "
                                                "'quant.fake_quantize'"):
        recipe = Recipe.from_dict(spec)
    assert recipe.steps[0].transform == "quant.fake_quantize"
    assert recipe.to_dict()["steps"][0]["transform"] == "quant.fake_quantize"
