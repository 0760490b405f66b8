"""The bundled evaluation corpus: enough distinct sentences and paraphrase pairs, and a stable split."""

from __future__ import annotations

import pytest

from leantorch.data import paraphrase_pairs, sentences, split


def test_sentences_are_many_unique_and_non_empty() -> None:
    items = sentences()
    assert len(items) >= 600
    assert len(set(items)) == len(items)
    assert all(s and s == s.strip() and not s.startswith("#") for s in items)


def test_sentences_returns_a_fresh_list() -> None:
    first = sentences()
    first.clear()
    assert len(sentences()) >= 600


def test_paraphrase_pairs_have_two_different_sides() -> None:
    pairs = paraphrase_pairs()
    assert len(pairs) >= 250
    assert len(set(pairs)) == len(pairs)
    for first, second in pairs:
        assert first and second
        assert first != second
        assert "\t" not in first and "\t" not in second


def test_split_is_deterministic_disjoint_and_complete() -> None:
    items = sentences()
    calibration, held_out = split(items, holdout=0.25, seed=3)
    assert (calibration, held_out) == split(items, holdout=0.25, seed=3)
    assert set(calibration).isdisjoint(held_out)
    assert sorted(calibration + held_out) == sorted(items)
    assert len(held_out) == round(len(items) * 0.25)
    assert split(items, seed=4) != split(items, seed=3)


def test_split_does_not_modify_its_input() -> None:
    items = list(range(20))
    split(items, holdout=0.5, seed=1)
    assert items == list(range(20))


@pytest.mark.parametrize("holdout", [0, 1, 0.0, 1.0, -0.1, 1.5])
def test_split_rejects_holdout_outside_the_open_interval(holdout: float) -> None:
    with pytest.raises(ValueError, match="holdout"):
        split(list(range(10)), holdout=holdout)
