"""The progress bar ends its line even when the loop it draws for is interrupted."""

from __future__ import annotations

import pytest

from leantorch.compress.progress import showing, track


def test_an_interrupted_bar_ends_its_line(capsys) -> None:
    with showing(), pytest.raises(KeyboardInterrupt):
        for i in track(range(4), 4, "calibrating"):
            if i == 2:
                raise KeyboardInterrupt
    err = capsys.readouterr().err
    assert err == ("\r  calibrating [#####               ] 1/4"
                   "\r  calibrating [##########          ] 2/4\n")


def test_a_finished_bar_ends_its_line_once_and_nothing_drawn_prints_nothing(capsys) -> None:
    with showing():
        assert list(track(range(2), 2, "x")) == [0, 1]
        assert list(track([], 3, "empty")) == []
    assert capsys.readouterr().err == ("\r  x [##########          ] 1/2"
                                       "\r  x [####################] 2/2\n")
