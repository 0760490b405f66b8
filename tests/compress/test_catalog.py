"""leantorch.compress.transforms(): the registry as data, for listing and for search."""

from __future__ import annotations

import inspect
import json

import pytest

from leantorch.compress import Knob, transforms
from leantorch.compress.catalog import CONTRACT_ARGUMENTS, argument_docs, describe_transform
from leantorch.compress.registry import get_transform, transform_names
from leantorch.errors import LeanError


def by_function(qualname: str):
    """The transform whose function is ``qualname`` (registry names may be renamed to match
    their functions; the functions are what these tests know by hand)."""
    (info,) = [t for t in transforms() if t.function.endswith(f":{qualname}")]
    return info


def test_every_registered_transform_is_listed_once_in_name_order():
    names = [t.name for t in transforms()]
    assert names == transform_names()
    assert len(set(names)) == len(names)
    assert {"quant.int8_dynamic", "quant.int8_weight", "quant.int4_weight"} <= set(names)


def test_knobs_are_the_signature_less_the_contract_arguments():
    for info in transforms():
        fn = get_transform(info.name)
        parameters = inspect.signature(fn).parameters
        knob_names = [k.name for k in info.knobs]
        assert not set(knob_names) & CONTRACT_ARGUMENTS, info.name
        # signature order, nothing dropped but the contract arguments; a **kwargs catch-all
        # is named apart, not listed as a knob
        variadic = [n for n, p in parameters.items() if p.kind is p.VAR_KEYWORD]
        assert knob_names == [p for p in parameters
                              if p not in CONTRACT_ARGUMENTS and p not in variadic], info.name
        assert info.extra_keywords == (variadic[0] if variadic else ""), info.name
        assert info.uses_calibration == ("calibration" in parameters), info.name
        module, qualname = info.function.split(":")
        assert (fn.__module__, fn.__qualname__) == (module, qualname)


def test_int8_weight_knobs_by_hand():
    info = describe_transform("quant.int8_weight")
    assert [(k.name, k.annotation, k.required, k.default) for k in info.knobs] == [
        ("group_size", "int | None", False, None),
        ("symmetric", "bool", False, True),
        ("include", "Patterns", False, None),
        ("exclude", "Patterns", False, None),
    ]
    docs = {k.name: k.doc for k in info.knobs}
    assert docs["group_size"] == "input features per scale (None: one scale per output channel)."
    assert docs["symmetric"].startswith("codes in [-127, 127] times a scale")
    assert not info.uses_calibration and not info.has_check
    assert info.summary.startswith("Replace Linear layers by 8-bit weight-only")


def _args_section(docstring: str) -> str:
    """The ``Args:`` header and its indented lines, up to the next unindented line."""
    lines = inspect.cleandoc(docstring).splitlines()
    start = lines.index("Args:")
    end = next((i for i in range(start + 1, len(lines))
                if lines[i].strip() and not lines[i].startswith(" ")), len(lines))
    return "\n".join(lines[start:end])


def test_every_knob_of_every_transform_has_a_doc_in_an_args_section():
    undocumented, outside_args = [], []
    for info in transforms():
        in_section = argument_docs(_args_section(get_transform(info.name).__doc__ or "Args:"))
        for knob in info.knobs:
            if len(knob.doc.split()) < 2:  # empty, or a bare word that explains nothing
                undocumented.append(f"{info.name}.{knob.name}")
            elif in_section.get(knob.name) != knob.doc:
                outside_args.append(f"{info.name}.{knob.name}")
    assert undocumented == [], "knobs without a doc (see `leantorch transforms`)"
    assert outside_args == [], "knobs documented outside the Args: section"
    # the parse is the one `leantorch transforms` prints: two entries by hand
    nm = {k.name: k.doc for k in describe_transform("prune.nm").knobs}
    assert nm["n"].startswith("weights kept in every group of ``m`` (1 <= n <= m")
    assert nm["m"].startswith("group length along the input dimension; a layer whose")


def test_lowrank_reads_calibration_and_has_a_check():
    info = by_function("svd")
    assert info.uses_calibration and info.has_check
    assert [k.name for k in info.knobs][:4] == ["rank", "energy", "param_ratio",
                                                "activation_aware"]


def test_moefy_split_names_its_keyword_catch_all():
    info = by_function("split")
    assert info.extra_keywords == "moe_args"
    assert "moe_args" not in [k.name for k in info.knobs]


def test_unknown_transform_names_the_known_ones():
    with pytest.raises(LeanError, match=r"unknown transform 'quant\.int3'.*quant\.int8_dynamic"):
        describe_transform("quant.int3")


def test_to_dict_round_trips_through_json():
    data = [t.to_dict() for t in transforms()]
    assert json.loads(json.dumps(data, allow_nan=False)) == data
    structured = by_function("structured").to_dict()
    units = next(k for k in structured["knobs"] if k["name"] == "units")
    # a tuple default is not silently turned into a JSON list
    assert units["default"] == "('channels', 'heads', 'neurons')" and units["default_repr"]


def test_knob_to_dict_required_and_plain_default():
    required = Knob("rank", "int", True, None, "the rank").to_dict()
    assert required == {"name": "rank", "annotation": "int", "required": True,
                        "default": None, "doc": "the rank"}
    assert "default_repr" not in Knob("ratio", "float", False, 0.5, "").to_dict()
    assert Knob("fn", "", False, len, "").to_dict()["default"] == repr(len)


def test_argument_docs_reads_a_google_args_section():
    doc = inspect.cleandoc("""Summary line.

        Args:
            ratio: fraction removed,
                exactly round(ratio * n).
            scope (str): "layer" or "global".

            seed: random seed.

        Returns:
            model: not an argument.
        """)
    assert argument_docs(doc) == {"ratio": "fraction removed, exactly round(ratio * n).",
                                  "scope": '"layer" or "global".', "seed": "random seed."}


def test_argument_docs_falls_back_to_prose_entries():
    doc = ("Mask weights. ``group_size``: features per scale (e.g. 8; None: per channel); "
           "symmetric: codes in [-7, 7]. Layers whose width: is odd are skipped.")
    docs = argument_docs(doc)
    # the clause ends at the first ". " or "; " outside brackets
    assert docs["group_size"] == "features per scale (e.g. 8; None: per channel)"
    assert docs["symmetric"] == "codes in [-7, 7]"
    assert "width" not in docs  # a word before a colon mid-sentence is prose, not an entry


def test_args_section_wins_over_prose():
    doc = "``rank``: from prose.\n\nArgs:\n    rank: from the section."
    assert argument_docs(doc) == {"rank": "from the section."}
