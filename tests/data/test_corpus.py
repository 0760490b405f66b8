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


def test_reference_sentences_are_prose_from_the_python_reference() -> None:
    from pydoc_data.topics import topics

    from leantorch.data import reference_sentences

    items = reference_sentences()
    assert len(items) >= 300 and len(set(items)) == len(items)
    assert items == reference_sentences()  # deterministic
    source = " ".join(" ".join(v.split()) for v in topics.values())
    for s in items:
        assert 6 <= len(s.split()) <= 40 and s[0].isupper() and s.endswith(".")
        assert not set(s) & set('=(){}[]<>|\\_`*"#@'), s
        # every sentence is the reference's own text (wrapped lines rejoined), nothing made up
        assert s in source or s.replace("-", "- ") in source, s


def test_corpora_are_disjoint_and_calibration_is_larger_and_mixed() -> None:
    from leantorch.data import corpora, reference_sentences

    sets = corpora(holdout=0.25, seed=0)
    calibration_part, held_out = split(sentences(), holdout=0.25, seed=0)
    assert sets.held_out == held_out
    assert sets.second == reference_sentences()
    cal = set(sets.calibration)
    assert cal.isdisjoint(sets.held_out) and cal.isdisjoint(sets.second)
    assert set(sets.held_out).isdisjoint(sets.second)
    paraphrases = {t for pair in paraphrase_pairs() for t in pair}
    assert cal == set(calibration_part) | paraphrases  # nothing dropped, nothing else added
    assert len(sets.calibration) == len(cal) >= 900
    # shuffled: the first 256 (a recipe's calibration samples) hold both sources
    head = set(sets.calibration[:256])
    assert 64 < len(head & paraphrases) < 192
    assert corpora(holdout=0.25, seed=0) == sets and corpora(seed=1) != sets
