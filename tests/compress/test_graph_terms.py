"""The term algebra under the dependency graph (``leantorch.compress.graph.terms``): unify,
refinement of atoms by reshapes and slices, and the unit maps groups are built from. Sizes are
small enough to check every index by hand."""

from __future__ import annotations

import pytest
import torch

from leantorch.compress.graph.terms import ONE, Atom, Dims, Product, Sum, concat, product
from leantorch.errors import LeanError


def test_size_one_is_the_empty_product_and_sizes_compose() -> None:
    dims = Dims()
    assert dims.new(1) == ONE == Product(())
    a, b = dims.new(3), dims.new(4)
    assert isinstance(a, Atom) and isinstance(b, Atom)
    assert dims.size(product((a, b))) == 12
    assert dims.size(concat((a, b))) == 7
    with pytest.raises(LeanError, match="axis of size 0"):
        dims.new(0)


def test_product_and_concat_flatten_nesting_and_unwrap_one_part() -> None:
    dims = Dims()
    a, b, c = dims.new(2), dims.new(3), dims.new(5)
    assert product((a, product((b, c)))) == Product((a, b, c))
    assert concat((concat((a, b)), c)) == Sum((a, b, c))
    assert product((a,)) == a and concat((a,)) == a


def test_unify_merges_atoms_and_keeps_their_reasons_and_tags() -> None:
    dims = Dims()
    a, b = dims.new(4, "model input"), dims.new(4)
    dims.tag(b, "heads")
    dims.unify(a, b, "add")
    assert dims.resolve(a) == dims.resolve(b) == Atom(0)  # the older atom stays root
    assert dims.blocked[0] == ["model input"] and dims.tags[0] == {"heads"}


def test_unify_of_unequal_sizes_blocks_both_sides() -> None:
    dims = Dims()
    a, b = dims.new(4), dims.new(6)
    dims.unify(a, b, "op")
    assert dims.blocked[0] == dims.blocked[1] == ["op: sizes 4 and 6 disagree"]
    assert dims.find(0) != dims.find(1)


def test_a_reshape_refines_the_atom_everywhere_and_maps_units_to_blocks() -> None:
    dims = Dims()
    rows = dims.new(6)  # a projection's rows, later viewed as heads x head_dim
    heads, head_dim = dims.new(2), dims.new(3)
    dims.unify(rows, product((heads, head_dim)), "view")
    assert dims.resolve(rows) == Product((heads, head_dim))
    # unit h of the heads atom occupies rows 3h..3h+2; unit d of head_dim every third row
    assert dims.unit_map(rows, heads.index).tolist() == [0, 0, 0, 1, 1, 1]
    assert dims.unit_map(rows, head_dim.index).tolist() == [0, 1, 2, 0, 1, 2]


def test_unify_of_products_splits_the_coarser_factor() -> None:
    dims = Dims()
    a, b = dims.new(6), dims.new(2)  # (6, 2) against (3, 4): 6 splits into 3 x 2
    c, d = dims.new(3), dims.new(4)
    dims.unify(product((a, b)), product((c, d)), "view")
    ra, rd = dims.resolve(a), dims.resolve(d)
    # a = c x s and d = s x b, with s the new 2-sized atom both share
    assert isinstance(ra, Product) and ra.factors[0] == c
    assert [dims.size(f) for f in ra.factors] == [3, 2]
    assert isinstance(rd, Product) and rd.factors == (ra.factors[1], b)
    assert not dims.blocked


def test_a_slice_refines_into_a_sum_and_units_keep_their_offsets() -> None:
    dims = Dims()
    qkv = dims.new(6)
    k = dims.part(qkv, 2, 4, "slice")
    assert dims.size(k) == 2
    parts = dims.resolve(qkv)
    assert isinstance(parts, Sum) and [dims.size(p) for p in parts.parts] == [2, 2, 2]
    assert dims.unit_map(qkv, k.index).tolist() == [-1, -1, 0, 1, -1, -1]


def test_mixed_dimensions_are_blocked_not_guessed() -> None:
    dims = Dims()
    a, b = dims.new(2), dims.new(3)  # (2, 3) against (3, 2): no common refinement
    c, d = dims.new(3), dims.new(2)
    dims.unify(product((a, b)), product((c, d)), "view")
    for atom in (a, b, c, d):
        assert any("dimensions are mixed" in r for r in dims.blocked[dims.find(atom.index)])


def test_an_atom_twice_in_one_product_is_flagged() -> None:
    dims = Dims()
    a = dims.new(2)
    square = product((a, a))
    assert dims.repeats_in_product(square, a.index)
    assert not dims.repeats_in_product(concat((a, a)), a.index)
    assert torch.equal(dims.unit_map(concat((a, a)), a.index), torch.tensor([0, 1, 0, 1]))
