"""File writing that never leaves a half-written file or folder behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from leantorch.errors import LeanError

__all__ = ["atomic_directory", "atomic_write_bytes", "atomic_write_text", "check_output_dir",
           "read_text_file"]


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename, so a
    reader sees either the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file private (0600); give it the mode a plain open() would
        os.fchmod(fd, path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` as UTF-8 to ``path`` atomically (see :func:`atomic_write_bytes`): the
    file is the old one or the complete new one, never half-written. Returns the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def check_output_dir(path: str | os.PathLike[str], *, overwrite: bool = False,
                     name: str = "output folder") -> Path:
    """Check, before any work runs, that a folder can later be written at ``path``.

    Refuses (with :class:`LeanError` naming ``name`` and the path) an existing regular file, a
    path under a regular file, a folder that cannot be created (probed by making and removing a
    temporary folder in the nearest existing parent, which also catches read-only file systems
    that permission bits do not show), and an existing non-empty folder unless ``overwrite``.
    """
    path = Path(path)
    where = f"{name} {str(path)!r}"
    resolved = path.resolve()
    cwd = Path.cwd().resolve()
    if resolved in (cwd, *cwd.parents) or resolved == Path.home().resolve():
        # replacing these would move the shell's own folder (or the home folder) aside
        raise LeanError(f"{where} is the current folder, one above it, or the home folder; "
                        "give a new folder to write into")
    if path.is_symlink() and not path.exists():
        raise LeanError(f"{where} is a broken symbolic link; give a folder path")
    if path.exists():
        if not path.is_dir():
            raise LeanError(f"{where} is an existing file, not a folder; give a folder path")
        if not overwrite and any(path.iterdir()):
            flag = "--overwrite" if name.startswith("--") else "overwrite=True (--overwrite)"
            raise LeanError(f"{where} already exists and is not empty; pass {flag} to replace "
                            "it, or choose another folder")
    existing = path.parent
    while not existing.exists() and not existing.is_symlink():
        existing = existing.parent
    if not existing.is_dir():
        raise LeanError(f"{where} lies under {str(existing)!r}, which is a file, not a folder")
    try:
        probe = tempfile.mkdtemp(prefix=".leantorch-probe.", dir=existing)
    except OSError as error:
        raise LeanError(f"{where} cannot be created: {str(existing)!r} is not writable "
                        f"({error.strerror or error})") from error
    os.rmdir(probe)
    return path


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Build a folder's contents in a hidden temporary sibling, then rename it to ``path``, so
    ``path`` is either complete or absent (an error or Ctrl-C inside the block removes the
    temporary folder, and any parent folders this call created).

    An existing empty folder at ``path`` is replaced. An existing non-empty one is refused
    unless ``overwrite``; then it is renamed aside, the new folder renamed in, and only then
    the old one deleted (if the second rename fails the old folder is put back).

    Example::

        >>> with atomic_directory("out/run1") as tmp:  # doctest: +SKIP
        ...     (tmp / "report.json").write_text("{}")
    """
    path = Path(path)
    check_output_dir(path, overwrite=overwrite)
    created = []  # parents made here, innermost last, removed again on failure
    parent = path.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    for folder in reversed(created):
        folder.mkdir()
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        # mkdtemp makes the folder private (0700); give it the mode a plain mkdir() would
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        _move_into_place(tmp, path, overwrite)
        tmp = None
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for folder in created:
            with contextlib.suppress(OSError):  # only if still empty
                folder.rmdir()
        raise


def _move_into_place(tmp: Path, path: Path, overwrite: bool) -> None:
    if path.is_dir() and not path.is_symlink():
        if not any(path.iterdir()):
            path.rmdir()
        elif not overwrite:
            raise LeanError(f"output folder {str(path)!r} appeared while working and is not "
                            "empty; pass overwrite=True (--overwrite) to replace it")
        else:
            aside = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(path, aside)
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(aside, path)
                raise
            shutil.rmtree(aside, ignore_errors=True)
            return
    os.rename(tmp, path)


def read_text_file(path: str | os.PathLike[str], what: str, expected: str = "a text file"
                   ) -> str:
    """The UTF-8 text of ``path``; a binary file (NUL bytes, or bytes that are not UTF-8) is a
    :class:`LeanError` naming ``what`` instead of a decoding traceback."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise LeanError(f"{what} cannot be read: {error.strerror or error}") from error
    if b"\0" in data:
        raise LeanError(f"{what} is not {expected}: it holds NUL bytes (a binary file?)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise LeanError(f"{what} is not {expected}: byte {error.start} is not UTF-8 "
                        "(a binary file?)") from error
