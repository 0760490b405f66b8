"""Atomic file writes: whole file or nothing, with ordinary permissions."""

from __future__ import annotations

import os
import stat

import pytest

from leantorch import io
from leantorch.errors import LeanError


def test_atomic_write_replaces_the_whole_file(tmp_path) -> None:
    path = tmp_path / "sub" / "out.json"
    io.atomic_write_text(path, "first")
    io.atomic_write_text(path, "second")
    assert path.read_text() == "second"
    assert [p.name for p in path.parent.iterdir()] == ["out.json"]


def test_new_files_get_the_umask_mode_and_old_files_keep_theirs(tmp_path) -> None:
    mask = os.umask(0o022)
    try:
        path = io.atomic_write_text(tmp_path / "a.txt", "x")
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        path.chmod(0o600)
        io.atomic_write_text(path, "y")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        os.umask(mask)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch) -> None:
    path = tmp_path / "keep.txt"
    path.write_text("old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(io.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        io.atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


# --------------------------------------------------------------------------- whole folders
def test_a_folder_appears_complete_and_in_one_piece(tmp_path) -> None:
    out = tmp_path / "a" / "b" / "out"
    with io.atomic_directory(out) as tmp:
        (tmp / "one.txt").write_text("1")
        assert not out.exists()  # nothing at the target until the block ends
        assert tmp.parent == out.parent
        (tmp / "two.txt").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["one.txt", "two.txt"]
    assert [p.name for p in out.parent.iterdir()] == ["out"]


def test_an_interrupt_leaves_no_folder_no_temporary_and_no_new_parents(tmp_path) -> None:
    out = tmp_path / "new" / "out"
    with pytest.raises(KeyboardInterrupt), io.atomic_directory(out) as tmp:
        (tmp / "model.safetensors").write_text("half")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []  # the parent this call made is gone too


def test_the_new_folder_gets_the_umask_mode(tmp_path) -> None:
    mask = os.umask(0o022)
    try:
        with io.atomic_directory(tmp_path / "out") as tmp:
            (tmp / "x").write_text("x")
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755


def test_an_empty_folder_is_replaced_a_full_one_needs_overwrite(tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with io.atomic_directory(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    with pytest.raises(LeanError, match=r"already exists and is not empty.*--overwrite"), \
            io.atomic_directory(out):
        pytest.fail("the block must not run")
    with io.atomic_directory(out, overwrite=True) as tmp:
        (tmp / "newer.txt").write_text("newer")
    # replaced whole, not merged; no aside copy or temporary left beside it
    assert [p.name for p in out.iterdir()] == ["newer.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_failed_swap_puts_the_old_folder_back(tmp_path, monkeypatch) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    real_rename = os.rename
    calls = []

    def rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # moving the new folder in
            raise OSError("device busy")
        real_rename(src, dst)

    monkeypatch.setattr(io.os, "rename", rename)
    with pytest.raises(OSError, match="device busy"), \
            io.atomic_directory(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert (out / "old.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_check_output_dir_refuses_what_cannot_become_a_folder(tmp_path) -> None:
    file = tmp_path / "f.txt"
    file.write_text("x")
    with pytest.raises(LeanError, match=r"'.*f\.txt' is an existing file, not a folder"):
        io.check_output_dir(file, name="--out")
    with pytest.raises(LeanError, match=r"lies under '.*f\.txt', which is a file"):
        io.check_output_dir(file / "a" / "b")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep").write_text("x")
    with pytest.raises(LeanError, match="--overwrite"):
        io.check_output_dir(full)
    assert io.check_output_dir(full, overwrite=True) == full
    assert io.check_output_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt", "full"]  # probes removed


def test_read_text_file_refuses_binary_files(tmp_path) -> None:
    text = tmp_path / "t.txt"
    text.write_text("héllo\n", encoding="utf-8")
    assert io.read_text_file(text, "--data t.txt") == "héllo\n"
    nul = tmp_path / "n.bin"
    nul.write_bytes(b"abc\x00def")
    with pytest.raises(LeanError, match=r"--data n\.bin is not a text file: it holds NUL bytes"):
        io.read_text_file(nul, "--data n.bin")
    latin = tmp_path / "l.txt"
    latin.write_bytes(b"caf\xe9")
    with pytest.raises(LeanError, match="byte 3 is not UTF-8"):
        io.read_text_file(latin, "--data l.txt")


@pytest.mark.parametrize("target", [".", "..", "~"])
def test_check_output_dir_never_replaces_the_working_or_home_folder(target, tmp_path,
                                                                    monkeypatch) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    with pytest.raises(LeanError, match="is the current folder, one above it, or the home"):
        io.check_output_dir(os.path.expanduser(target), overwrite=True)
    assert work.is_dir()
